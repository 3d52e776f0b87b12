import json
import os

import pytest
import torch

import optimum_evopress.compressor as compressor_module
from conftest import corpus, make_model, reload_in_fresh_process, with_scaled_logits
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.configuration import CONFIG_NAME

IDS = torch.randint(2, 150, (2, 20), generator=torch.Generator().manual_seed(3))


def small_config(**overrides):
    settings = dict(method="depth", target=0.34, calibration_dataset=corpus(), sequence_length=16,
                    calibration_tokens=256, evaluation_tokens=64, offspring=4, survivors_per_selection=[2, 1],
                    tokens_per_selection=[32, 128], generations=3, initial_candidates=2, batch_size=4)
    settings.update(overrides)
    return EvoPressConfig(**settings)


def test_compress_save_and_reload_with_plain_transformers(tokenizer, tmp_path):
    model = make_model()
    compressor = EvoPressCompressor(model, tokenizer)
    config = small_config()
    compressed = compressor.compress(config, progress=False)
    assert compressed is model
    result = compressor.result
    dropped = [unit for unit, level in result.levels.items() if level == "dropped"]
    assert len(result.levels) == 6 and len(dropped) == 2 == result.budget["cost"] == result.budget["budget"]
    assert compressed.config.num_hidden_layers == 4
    assert [row["generation"] for row in result.history] == [0, 1, 2, 3]
    assert all(row["tokens"] > 0 and row["seconds"] >= 0 and row["fitness"] >= 0 for row in result.history)
    assert result.perplexity["compressed"] > 0 and result.perplexity["dense"] > 0
    with torch.no_grad():
        expected = compressed(input_ids=IDS).logits
    compressed.save_pretrained(tmp_path / "plain")
    compressor.save_pretrained(tmp_path / "full")
    record = json.loads((tmp_path / "full" / CONFIG_NAME).read_text())
    assert record["levels"] == result.levels and record["config"] == config.to_dict()
    assert {"transformers", "torch", "optimum_evopress"} <= set(record["versions"])
    assert EvoPressConfig.from_pretrained(tmp_path / "full") == config
    assert (tmp_path / "full" / "tokenizer.json").is_file()
    reloaded = reload_in_fresh_process([tmp_path / "plain", tmp_path / "full"], IDS, tmp_path)
    for out in reloaded.values():
        torch.testing.assert_close(out["logits"], expected, rtol=0, atol=0)
        assert out["num_hidden_layers"] == 4


@pytest.mark.parametrize("search", ["random", "brute_force", "one_at_a_time", "shortgpt", "sliding_window"])
def test_baselines_share_the_api_and_meet_the_budget(tokenizer, search):
    compressor = EvoPressCompressor(make_model(), tokenizer)
    compressor.compress(small_config(search=search, evaluation_tokens=0), progress=False)
    assert sum(level == "dropped" for level in compressor.result.levels.values()) == 2
    assert compressor.result.search == search


def test_brute_force_is_at_least_as_good_as_every_other_assignment(tokenizer):
    compressor = EvoPressCompressor(make_model(), tokenizer)
    compressor.compress(small_config(search="brute_force", evaluation_tokens=0), progress=False)
    assert compressor.result.fitness is not None and compressor.result.fitness > 0


@pytest.mark.parametrize("fitness", ["kl", "topk_kl", "topk_kl_renormalized", "ppl"])
def test_every_fitness_runs_and_the_search_is_deterministic(tokenizer, fitness):
    levels = []
    for _ in range(2):
        compressor = EvoPressCompressor(make_model(), tokenizer)
        compressor.compress(small_config(fitness=fitness, topk=8, evaluation_tokens=0), progress=False)
        levels.append(compressor.result.levels)
    assert levels[0] == levels[1]


def test_resume_through_the_compressor(tokenizer, tmp_path):
    state = str(tmp_path / "state.json")
    full = EvoPressCompressor(make_model(), tokenizer)
    full.compress(small_config(generations=4, evaluation_tokens=0), progress=False)
    EvoPressCompressor(make_model(), tokenizer).compress(
        small_config(generations=2, evaluation_tokens=0, checkpoint_path=state), progress=False)
    resumed = EvoPressCompressor(make_model(), tokenizer)
    resumed.compress(small_config(generations=4, evaluation_tokens=0, checkpoint_path=state, resume_from=state),
                     progress=False)
    assert resumed.result.levels == full.result.levels
    assert [r["fitness"] for r in resumed.result.history] == [r["fitness"] for r in full.result.history]


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fails the test if the compressor gets as far as loading data."""
    def fail(*args, **kwargs):
        raise AssertionError("expensive work started before the input was checked")
    monkeypatch.setattr(compressor_module, "prepare_token_data", fail)


def test_non_empty_output_directory_fails_first(tokenizer, tmp_path, no_data_loading):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        EvoPressCompressor(make_model(), tokenizer).compress(small_config(), save_dir=tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_text_without_tokenizer_fails_first(tmp_path, no_data_loading):
    with pytest.raises(ValueError, match="tokenizer"):
        EvoPressCompressor(make_model()).compress(small_config(), save_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_model_without_decoder_blocks_fails_first(tokenizer, no_data_loading):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="not supported"):
        EvoPressCompressor(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2)), tokenizer).compress(
            small_config())
    with pytest.raises(TypeError, match="PreTrainedModel"):
        EvoPressCompressor("not a model")


def test_topk_beyond_the_vocabulary_fails_first(tokenizer, no_data_loading):
    with pytest.raises(ValueError, match="topk: the model's vocabulary holds 320 tokens, got 400"):
        EvoPressCompressor(make_model(), tokenizer).compress(small_config(fitness="topk_kl", topk=400))


def test_renormalized_topk_kl_on_a_model_with_scaled_logits_fails_before_the_database(tokenizer, tmp_path):
    model = with_scaled_logits(make_model())
    config = small_config(method="sparsity", target=0.5, fitness="topk_kl_renormalized", topk=8,
                          database_dir=str(tmp_path / "db"))
    with pytest.raises(ValueError, match="topk_kl_renormalized.*differ from the model's logits"):
        EvoPressCompressor(model, tokenizer).compress(config, save_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "db").exists() and not (tmp_path / "out").exists()


def test_unreachable_target_fails_first(tokenizer, no_data_loading):
    with pytest.raises(ValueError, match="target"):
        EvoPressCompressor(make_model(), tokenizer).compress(small_config(target=0.95))


def test_stage_tokens_beyond_the_calibration_set(tokenizer, no_data_loading):
    with pytest.raises(ValueError, match="tokens_per_selection"):
        small_config(tokens_per_selection=[32, 512])
    # Also when the offending value comes from the preset's defaults (cpu: more tokens in the last stage).
    with pytest.raises(ValueError, match="tokens_per_selection"):
        EvoPressConfig(preset="cpu", calibration_tokens=600, calibration_dataset=corpus())


def test_interrupted_save_leaves_nothing_behind(tokenizer, tmp_path, monkeypatch):
    compressor = EvoPressCompressor(make_model(), tokenizer)
    compressor.compress(small_config(evaluation_tokens=0), progress=False)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(KeyboardInterrupt):
        compressor.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_sequences_longer_than_the_model_reads_fail_first(tokenizer, no_data_loading):
    with pytest.raises(ValueError, match="sequence_length.*at most 256"):
        EvoPressCompressor(make_model(), tokenizer).compress(small_config(sequence_length=512,
                                                                          calibration_tokens=1024))


def test_missing_resume_state_fails_first(tokenizer, tmp_path, no_data_loading):
    with pytest.raises(FileNotFoundError, match="resume_from"):
        EvoPressCompressor(make_model(), tokenizer).compress(small_config(resume_from=str(tmp_path / "x.json")))


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(granularity="sublayer", target=0.25),
    dict(method="quantization", target=2.5, bits=[2, 3, 4, 8], group_size=16, calibration_tokens=512,
         sequence_length=32, tokens_per_selection=[64, 256]),
    dict(method="sparsity", target=0.5, calibration_tokens=512, sequence_length=32, tokens_per_selection=[64, 256]),
])
def test_prefix_reuse_changes_no_fitness_and_runs_fewer_blocks(tokenizer, overrides, monkeypatch):
    import optimum_evopress.fitness as fitness_module

    runs = {}
    original = fitness_module.FitnessEvaluator._run
    for reuse in (False, True):
        blocks = []

        def counting(self, *args, **kwargs):
            before = self.blocks_run
            value = original(self, *args, **kwargs)
            blocks.append(self.blocks_run - before)
            return value

        monkeypatch.setattr(fitness_module.FitnessEvaluator, "_run", counting)
        compressor = EvoPressCompressor(make_model(), tokenizer)
        compressor.compress(small_config(**{"generations": 4, "evaluation_tokens": 0, **overrides},
                                         reuse_prefix=reuse), progress=False)
        runs[reuse] = (compressor.result, sum(blocks))
    plain, reused = runs[False][0], runs[True][0]
    assert reused.levels == plain.levels
    assert [row["fitness"] for row in reused.history] == [row["fitness"] for row in plain.history]
    assert 0 < runs[True][1] < runs[False][1]


def biased_qwen2():
    """A Qwen2 model (q/k/v projections with a bias) whose biases are not zero."""
    model = make_model("qwen2")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("model_factory,overrides", [
    (make_model, dict()),
    (make_model, dict(granularity="sublayer", target=0.25)),
    (biased_qwen2, dict(method="quantization", target=2.5, bits=[2, 3, 4, 8], group_size=16, calibration_tokens=512,
                        sequence_length=32, tokens_per_selection=[64, 256])),
    (make_model, dict(method="sparsity", target=0.5, calibration_tokens=512, sequence_length=32,
                      tokens_per_selection=[64, 256], fitness="topk_kl_renormalized", topk=16, reuse_prefix=False)),
])
def test_stacked_candidates_score_as_one_at_a_time(tokenizer, model_factory, overrides, monkeypatch):
    from optimum_evopress.fitness import FitnessEvaluator
    from optimum_evopress.scoring import CandidateScorer

    class Recording(CandidateScorer):
        def __call__(self, candidates, *args, **kwargs):
            scores = super().__call__(candidates, *args, **kwargs)
            calls.append((list(candidates), scores))
            return scores

    copies = []
    original = FitnessEvaluator.score_stacked

    def counting(self, batch, number, *args, **kwargs):
        copies.append(number)
        return original(self, batch, number, *args, **kwargs)

    monkeypatch.setattr(compressor_module, "CandidateScorer", Recording)
    monkeypatch.setattr(FitnessEvaluator, "score_stacked", counting)
    runs = {}
    for size in (1, 3):
        calls = []
        compressor = EvoPressCompressor(model_factory(), tokenizer)
        compressor.compress(small_config(**{"generations": 3, "evaluation_tokens": 0, "offspring": 6, **overrides},
                                         candidate_batch_size=size), progress=False)
        runs[size] = (compressor.result, calls)
    (single, single_calls), (stacked, stacked_calls) = runs[1], runs[3]
    assert 3 in copies  # candidates were scored three at a time
    assert stacked.levels == single.levels
    assert [c for c, _ in stacked_calls] == [c for c, _ in single_calls]  # the same search, candidate for candidate
    # Every candidate's fitness, not only the winners': stacking changes no value (up to float rounding).
    assert len(stacked_calls) > 3 and max(len(c) for c, _ in stacked_calls) >= 6
    for (_, together), (_, alone) in zip(stacked_calls, single_calls):
        assert together == pytest.approx(alone, rel=1e-5, abs=1e-7)


def test_search_state_or_database_inside_the_output_directory_fails_first(tokenizer, tmp_path, no_data_loading):
    for name in ("checkpoint_path", "database_dir"):
        inside = str(tmp_path / "out" / ("state.json" if name == "checkpoint_path" else "db"))
        with pytest.raises(ValueError, match=f"{name}: .* lies inside the output directory"):
            EvoPressCompressor(make_model(), tokenizer).compress(small_config(**{name: inside}),
                                                                 save_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_device_this_machine_lacks_fails_first(tokenizer, monkeypatch, no_data_loading):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device: 'cuda' is not available here \(0 CUDA devices\)"):
        EvoPressCompressor(make_model(), tokenizer).compress(small_config(device="cuda"))


def test_bad_calibration_data_leaves_the_model_as_it_was(tokenizer):
    model = make_model()
    with pytest.raises(ValueError, match="calibration_tokens"):
        EvoPressCompressor(model, tokenizer).compress(small_config(dtype="bfloat16",
                                                                   calibration_dataset=["tiny text"]))
    assert next(model.parameters()).dtype == torch.float32


def test_the_saved_record_leaves_out_the_runs_search_state_files(tokenizer, tmp_path):
    state = str(tmp_path / "state.json")
    compressor = EvoPressCompressor(make_model(), tokenizer)
    compressor.compress(small_config(generations=1, evaluation_tokens=0, checkpoint_path=state, resume_from=state),
                        save_dir=tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["config"]
    assert config["checkpoint_path"] is None and config["resume_from"] is None and os.path.isfile(state)


def test_overwrite_replaces_only_an_earlier_checkpoint_and_keeps_the_directory(tokenizer, tmp_path):
    compressor = EvoPressCompressor(make_model(), tokenizer)
    compressor.compress(small_config(generations=1, evaluation_tokens=0), progress=False)
    old_umask = os.umask(0o022)
    try:
        compressor.save_pretrained(tmp_path / "new")
        assert (tmp_path / "new").stat().st_mode & 0o777 == 0o755  # not a temporary directory's 0700
        (tmp_path / "out").mkdir(mode=0o750)
        compressor.save_pretrained(tmp_path / "out")  # an empty directory: filled, same inode and mode
        inode = (tmp_path / "out").stat().st_ino
        (tmp_path / "out" / "stale.bin").write_text("from the earlier run")
        compressor.save_pretrained(tmp_path / "out", overwrite=True)
    finally:
        os.umask(old_umask)
    assert (tmp_path / "out").stat().st_ino == inode and (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "new"))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    small_config().save_pretrained(tmp_path / "project")  # a saved config is not a checkpoint
    with pytest.raises(ValueError, match="holds no EvoPress checkpoint"):
        compressor.save_pretrained(tmp_path / "project", overwrite=True)
    assert sorted(os.listdir(tmp_path / "project")) == [CONFIG_NAME, "notes.txt"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_a_failed_overwrite_leaves_the_earlier_checkpoint_whole(tokenizer, tmp_path, monkeypatch):
    import optimum_evopress.export as export_module

    compressor = EvoPressCompressor(make_model(), tokenizer)
    compressor.compress(small_config(generations=1, evaluation_tokens=0), progress=False)
    compressor.save_pretrained(tmp_path / "out")
    before = {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")}
    real, calls = os.rename, [0]

    def failing(source, target):
        calls[0] += 1
        if calls[0] == len(before) + 2:  # the old files are aside, two new ones are in
            raise OSError("disk gone")
        real(source, target)

    monkeypatch.setattr(export_module.os, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        compressor.save_pretrained(tmp_path / "out", overwrite=True)
    assert {name: (tmp_path / "out" / name).read_bytes() for name in os.listdir(tmp_path / "out")} == before


@pytest.mark.parametrize("overrides", [{}, dict(method="quantization", target=3.0, bits=[2, 4], group_size=16)])
def test_an_interrupted_search_leaves_the_model_dense(tokenizer, monkeypatch, overrides):
    from optimum_evopress.fitness import FitnessEvaluator

    model = make_model()
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
    real, calls = FitnessEvaluator.score, [0]

    def interrupted(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FitnessEvaluator, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        EvoPressCompressor(model, tokenizer).compress(small_config(**overrides), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, dense, rtol=0, atol=0)
