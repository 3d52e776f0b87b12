"""Models loaded with accelerate's `device_map`, some blocks offloaded to disk: the search, the compressed
model and its checkpoint equal those of the same model loaded whole."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import corpus, disk_offload_map, make_model, reload_in_fresh_process
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.models import is_offloaded

IDS = torch.randint(2, 150, (2, 20), generator=torch.Generator().manual_seed(5))
OFFLOADED = (2, 3)
CASES = {
    "depth": dict(method="depth", target=0.34),
    "quantization": dict(method="quantization", target=2.5, bits=[2, 3, 4, 8], group_size=16),
    "sparsity": dict(method="sparsity", target=0.5),
}


def config(case, **overrides):
    settings = dict(**CASES[case], calibration_dataset=corpus(), calibration_tokens=512, sequence_length=32,
                    evaluation_tokens=0, tokens_per_selection=[64, 256], survivors_per_selection=[2, 1],
                    generations=3, offspring=4, initial_candidates=2, batch_size=4, seed=0)
    settings.update(overrides)
    return EvoPressConfig(**settings)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    make_model().save_pretrained(path)
    return path


def load_offloaded(path, offload_folder):
    model = AutoModelForCausalLM.from_pretrained(path, device_map=disk_offload_map(OFFLOADED),
                                                 offload_folder=str(offload_folder))
    assert is_offloaded(model.model.layers[OFFLOADED[0]].mlp.down_proj)
    assert model.model.layers[OFFLOADED[0]].mlp.down_proj.weight.device.type == "meta"
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_offloaded_model_compresses_as_the_whole_model(case, saved_model, tokenizer, tmp_path):
    whole = EvoPressCompressor(AutoModelForCausalLM.from_pretrained(saved_model).eval(), tokenizer)
    whole.compress(config(case), save_dir=tmp_path / "whole", progress=False)
    offloaded = EvoPressCompressor(load_offloaded(saved_model, tmp_path / "offload"), tokenizer)
    offloaded.compress(config(case), save_dir=tmp_path / "offloaded", progress=False)

    assert offloaded.result.levels == whole.result.levels
    # Equal fitness values of every generation's parent: a swap ignored in an offloaded block would change them.
    assert [row["fitness"] for row in offloaded.result.history] == [row["fitness"] for row in whole.result.history]
    with torch.no_grad():
        expected = whole.model(input_ids=IDS).logits
        torch.testing.assert_close(offloaded.model(input_ids=IDS).logits, expected, rtol=0, atol=0)
    reloaded = reload_in_fresh_process([tmp_path / "whole", tmp_path / "offloaded"], IDS, tmp_path)
    torch.testing.assert_close(reloaded[str(tmp_path / "offloaded")]["logits"],
                               reloaded[str(tmp_path / "whole")]["logits"], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["depth", "quantization"])
def test_offloaded_model_scores_stacked_candidates_as_the_whole_model_one_at_a_time(case, saved_model, tokenizer,
                                                                                   tmp_path):
    """Stacked candidates in offloaded blocks take their own levels (the hooks read offloaded variants and biases)."""
    whole = EvoPressCompressor(AutoModelForCausalLM.from_pretrained(saved_model).eval(), tokenizer)
    whole.compress(config(case), progress=False)
    offloaded = EvoPressCompressor(load_offloaded(saved_model, tmp_path / "offload"), tokenizer)
    offloaded.compress(config(case, candidate_batch_size=4), progress=False)
    assert offloaded.result.levels == whole.result.levels
    assert [row["fitness"] for row in offloaded.result.history] == pytest.approx(
        [row["fitness"] for row in whole.result.history], rel=1e-5)


def test_offloaded_layers_take_the_candidates_weights(saved_model, tokenizer, tmp_path):
    """A swap on an offloaded layer reaches its forward pass: the compressed offloaded blocks hold the variants."""
    model = load_offloaded(saved_model, tmp_path / "offload")
    compressor = EvoPressCompressor(model, tokenizer)
    compressor.compress(config("sparsity", target=0.6), progress=False)
    layer = model.model.layers[OFFLOADED[0]].mlp.down_proj
    stored = layer._hf_hook.weights_map["weight"]
    expected = model.config.evopress["layer_sparsity"][f"model.layers.{OFFLOADED[0]}.mlp.down_proj"]
    assert float((stored == 0).float().mean()) == pytest.approx(expected, abs=1 / stored.numel())
    assert layer.weight.device.type == "meta"  # still offloaded


def test_dtype_change_of_a_dispatched_model_is_refused_before_any_work(saved_model, tokenizer, tmp_path):
    model = load_offloaded(saved_model, tmp_path / "offload")
    with pytest.raises(ValueError, match=r"EvoPressConfig\.dtype: a model loaded with device_map keeps its dtype"):
        EvoPressCompressor(model, tokenizer).compress(config("sparsity", dtype="bfloat16"),
                                                      save_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_meta_weights_without_an_offload_hook_are_refused(tokenizer):
    with torch.device("meta"):
        model = make_model()
    with pytest.raises(ValueError, match=r"has no weight \(meta device\) and no accelerate offload hook"):
        EvoPressCompressor(model, tokenizer).compress(config("sparsity"), progress=False)


def test_renormalized_topk_kl_reads_the_rows_of_an_offloaded_output_head(saved_model, tmp_path):
    from optimum_evopress.fitness import FitnessEvaluator
    from optimum_evopress.methods import DepthPruning

    device_map = {**disk_offload_map(OFFLOADED), "lm_head": "disk"}
    offloaded = AutoModelForCausalLM.from_pretrained(saved_model, device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert is_offloaded(offloaded.lm_head) and offloaded.lm_head.weight.device.type == "meta"
    scores = []
    for model in (AutoModelForCausalLM.from_pretrained(saved_model).eval(), offloaded):
        evaluator = FitnessEvaluator(model, IDS, "topk_kl_renormalized", topk=8, layers=model.model.layers)
        evaluator.cache_teacher(progress=False)
        DepthPruning(model, config("depth")).set_levels((0, 1, 0, 0, 1, 0))
        scores.append(evaluator.score([(0, 20), (1, 12)]))
    assert scores[0] > 0.01 and scores[1] == scores[0]


def test_offloaded_sub_blocks_are_zeroed_in_memory_and_in_the_checkpoint(saved_model, tokenizer, tmp_path):
    levels = {f"model.layers.{i}.{part}": "kept" for i in range(6) for part in ("self_attn", "mlp")}
    levels.update({"model.layers.3.self_attn": "dropped", "model.layers.2.mlp": "dropped",  # offloaded blocks
                   "model.layers.0.mlp": "dropped"})
    fixed = config("depth", granularity="sublayer", target=3 / 12, search="fixed", levels=levels)
    whole = EvoPressCompressor(AutoModelForCausalLM.from_pretrained(saved_model).eval(), tokenizer)
    whole.compress(fixed, save_dir=tmp_path / "whole", progress=False)
    offloaded = EvoPressCompressor(load_offloaded(saved_model, tmp_path / "offload"), tokenizer)
    offloaded.compress(fixed, save_dir=tmp_path / "offloaded", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(offloaded.model(input_ids=IDS).logits, whole.model(input_ids=IDS).logits,
                                   rtol=0, atol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded")
    assert not reloaded.model.layers[3].self_attn.o_proj.weight.any()
    assert not reloaded.model.layers[2].mlp.down_proj.weight.any()
