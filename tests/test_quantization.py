"""Mixed-precision GPTQ end to end on tiny models: budget, database, export, baselines, bad input."""

import json
import os
from collections import defaultdict

import pytest
import torch
from safetensors.torch import load_file

from conftest import corpus, input_ids, logits, make_model, reload_in_fresh_process
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.formats import read_levels_file, write_levels_file
from optimum_evopress.methods.quantization import Quantization

BITS = [2, 3, 4, 8]


def quant_config(**overrides):
    settings = dict(method="quantization", target=3.0, bits=BITS, group_size=16, calibration_dataset=corpus(),
                    generations=4, offspring=4, survivors_per_selection=[2, 1], tokens_per_selection=[64, 256],
                    calibration_tokens=512, sequence_length=32, evaluation_tokens=0, initial_candidates=4, seed=0)
    settings.update(overrides)
    return EvoPressConfig(**settings)


def compress(tokenizer, model=None, **overrides):
    compressor = EvoPressCompressor(model if model is not None else make_model(num_layers=4), tokenizer)
    compressed = compressor.compress(quant_config(**overrides), progress=False)
    return compressor, compressed


@pytest.fixture(scope="module")
def quantized(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    # 2.5 is not a level, so the layers must mix bit-widths (every size group has an even count).
    compressor, compressed = compress(tokenizer, target=2.5, database_dir=str(root / "db"))
    compressor.save_pretrained(root / "out")
    return compressor, compressed, root


def test_budget_is_met_exactly_in_every_size_group(quantized):
    compressor, compressed, _ = quantized
    result = compressor.result
    assert result.budget["cost"] == result.budget["budget"]
    assert result.budget["average_bits"] == 2.5
    layer_bits = compressed.config.evopress["layer_bits"]
    assert set(layer_bits) == set(result.levels)  # granularity "linear": one unit per layer
    by_size = defaultdict(list)
    for name, bits in layer_bits.items():
        assert bits in BITS
        by_size[compressed.get_submodule(name).weight.numel()].append(bits)
    assert all(sum(bits) * 2 == 5 * len(bits) for bits in by_size.values())
    assert result.history and result.fitness is not None


def test_reloaded_checkpoint_gives_the_same_logits_without_our_import(quantized, tmp_path):
    compressor, compressed, root = quantized
    out = reload_in_fresh_process([root / "out"], input_ids(), tmp_path)[str(root / "out")]
    assert torch.equal(out["logits"], logits(compressed))  # exact: same integers, same scales, same dtype
    assert out["generated"].shape == (1, 16)

    with open(root / "out" / "config.json") as handle:
        qconfig = json.load(handle)["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors" and qconfig["format"] == "pack-quantized"
    assert qconfig["ignore"] == ["lm_head"]
    targets = {}
    for group in qconfig["config_groups"].values():
        assert group["weights"]["symmetric"] and group["weights"]["group_size"] == 16
        for target in group["targets"]:
            targets[target] = group["weights"]["num_bits"]
    expected = compressed.config.evopress["layer_bits"]
    assert len(targets) == len(expected)
    assert all(targets["re:^" + name.replace(".", r"\.") + "$"] == bits for name, bits in expected.items())
    state = load_file(root / "out" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight_packed" in state and "model.layers.0.self_attn.q_proj.weight" not in state
    assert state["model.layers.0.self_attn.q_proj.weight_packed"].dtype == torch.int32
    with open(root / "out" / "evopress_config.json") as handle:
        record = json.load(handle)
    assert record["config"]["method"] == "quantization" and record["levels"] == compressor.result.levels


def test_bfloat16_compression_reloads_bit_exact(tokenizer, tmp_path):
    # The model is cast after the method is set up: the dense weights must be taken from the cast model.
    compressor, compressed = compress(tokenizer, dtype="bfloat16", generations=2)
    assert {m.weight.dtype for m in compressor.method.linears.values()} == {torch.bfloat16}
    assert {s.dtype for s in compressed.state_dict().values() if s.is_floating_point()} == {torch.bfloat16}
    compressor.save_pretrained(tmp_path / "bf16")
    out = reload_in_fresh_process([tmp_path / "bf16"], input_ids(), tmp_path)[str(tmp_path / "bf16")]
    assert out["logits"].dtype == torch.bfloat16
    assert torch.equal(out["logits"], logits(compressed))


def test_bfloat16_at_8_bits_exports_the_integers_the_search_scored(tokenizer, tmp_path):
    # In bfloat16, rounding q * scale / scale again can miss an 8-bit integer by one: the export must not.
    compressor, compressed = compress(tokenizer, dtype="bfloat16", bits=[4, 8], target=8.0, search="uniform")
    assert set(compressed.config.evopress["layer_bits"].values()) == {8}
    compressor.save_pretrained(tmp_path / "bf16-8bit")
    out = reload_in_fresh_process([tmp_path / "bf16-8bit"], input_ids(), tmp_path)[str(tmp_path / "bf16-8bit")]
    assert torch.equal(out["logits"], logits(compressed))


def test_model_save_pretrained_writes_the_same_checkpoint(quantized, tmp_path):
    _, compressed, root = quantized
    before = logits(compressed)
    compressed.save_pretrained(tmp_path / "direct")
    direct, via_compressor = load_file(tmp_path / "direct" / "model.safetensors"), load_file(root / "out" / "model.safetensors")
    assert direct.keys() == via_compressor.keys()
    assert all(torch.equal(direct[key], via_compressor[key]) for key in direct)
    assert torch.equal(logits(compressed), before)  # saving left the in-memory model as it was


def test_model_save_pretrained_writes_on_the_main_process_only(quantized, tmp_path, monkeypatch):
    import torch.distributed as dist

    _, compressed, _ = quantized
    compressed.save_pretrained(tmp_path / "other", is_main_process=False)
    with monkeypatch.context() as patch:
        patch.setattr(dist, "is_initialized", lambda: True)
        patch.setattr(dist, "get_rank", lambda: 1)
        compressed.save_pretrained(tmp_path / "rank1")  # under torchrun, rank 0 writes
    assert not (tmp_path / "other").exists() and not (tmp_path / "rank1").exists()


def test_second_run_reuses_the_database(quantized, tokenizer, monkeypatch):
    compressor, compressed, root = quantized

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the database was rebuilt")

    monkeypatch.setattr(Quantization, "_build_database", no_rebuild)
    again, recompressed = compress(tokenizer, target=2.5, database_dir=str(root / "db"))
    assert again.result.levels == compressor.result.levels
    assert torch.equal(logits(recompressed), logits(compressed))
    streamed, from_disk = compress(tokenizer, target=2.5, database_dir=str(root / "db"), database_in_memory=False)
    assert streamed.result.levels == compressor.result.levels
    assert torch.equal(logits(from_disk), logits(compressed))


def test_database_built_with_other_settings_or_damaged_is_refused(quantized, tokenizer, tmp_path):
    _, _, root = quantized
    with pytest.raises(ValueError, match=r"other settings \(group_size: database has 16, asked for 32\)"):
        EvoPressCompressor(make_model(num_layers=4), tokenizer).compress(
            quant_config(group_size=32, database_dir=str(root / "db")), save_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="model: database has"):
        compress(tokenizer, model=make_model(num_layers=4, seed=1), database_dir=str(root / "db"))

    damaged = tmp_path / "damaged"
    compress(tokenizer, database_dir=str(damaged))
    victim = damaged / "model.layers.1.mlp.down_proj.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="down_proj.safetensors is damaged"):
        compress(tokenizer, database_dir=str(damaged))


def test_fused_and_block_granularity(tokenizer):
    fused, model = compress(tokenizer, granularity="fused")
    bits = model.config.evopress["layer_bits"]
    for i in range(4):
        prefix = f"model.layers.{i}"
        assert bits[f"{prefix}.self_attn.q_proj"] == bits[f"{prefix}.self_attn.k_proj"] == bits[f"{prefix}.self_attn.v_proj"]
        assert bits[f"{prefix}.mlp.gate_proj"] == bits[f"{prefix}.mlp.up_proj"]
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj" in fused.result.levels
    assert len(fused.result.levels) == 4 * 4
    assert fused.result.budget["cost"] == fused.result.budget["budget"]

    block, _ = compress(tokenizer, granularity="block", target=4.0)
    assert list(block.result.levels) == [f"model.layers.{i}" for i in range(4)]
    assert sum(block.result.levels.values()) == 16  # equal-size blocks averaging 4 bits


def test_mutation_rule_all_and_sequential_calibration(tokenizer):
    anywhere, _ = compress(tokenizer, mutation_rule="all", target=3.5)
    assert anywhere.result.budget["cost"] == anywhere.result.budget["budget"]
    assert anywhere.result.budget["average_bits"] == pytest.approx(3.5, abs=0.02)

    dense, _ = compress(tokenizer, calibration_bits="dense")
    sequential, _ = compress(tokenizer, calibration_bits=2)
    auto, _ = compress(tokenizer, target=2.5)
    assert auto.method.calibration_bits == 3 and auto.method.database.settings["calibration_bits"] == 3
    dense_errors, sequential_errors = dense.method.database.errors, sequential.method.database.errors
    first = "model.layers.0.self_attn.q_proj"
    assert dense_errors[first] == sequential_errors[first]  # block 0 sees the same inputs either way
    last = "model.layers.3.mlp.down_proj"
    assert dense_errors[last] != sequential_errors[last]


def test_uniform_dynamic_programming_and_random_baselines(tokenizer):
    uniform, _ = compress(tokenizer, search="uniform")
    assert set(uniform.result.levels.values()) == {3}
    dp, _ = compress(tokenizer, search="dynamic_programming")
    assert dp.result.budget["cost"] == dp.result.budget["budget"]
    errors = dp.method.unit_errors()
    space_bits = dp.method.bits

    def total(levels):
        return sum(errors[u][space_bits.index(b)] for u, b in enumerate(levels.values()))

    assert total(dp.result.levels) <= total(uniform.result.levels) + 1e-12
    random, _ = compress(tokenizer, search="random")
    assert random.result.budget["cost"] == random.result.budget["budget"]
    assert len(random.result.history[0]["candidate_scores"]) == 4


def test_levels_file_round_trip_applies_published_configurations(quantized, tokenizer, tmp_path):
    compressor, compressed, root = quantized
    path = tmp_path / "levels.txt"
    write_levels_file(compressed.config.evopress["layer_bits"], path)
    assert path.read_text().splitlines()[0] == f"model.layers.0.self_attn.q_proj: {compressed.config.evopress['layer_bits']['model.layers.0.self_attn.q_proj']}"
    assert read_levels_file(path) == compressed.config.evopress["layer_bits"]
    fixed, model = compress(tokenizer, search="fixed", levels=str(path), database_dir=str(root / "db"))
    assert fixed.result.levels == compressor.result.levels
    assert torch.equal(logits(model), logits(compressed))
    from_checkpoint, _ = compress(tokenizer, search="fixed", levels=str(root / "out" / "evopress_config.json"),
                                  database_dir=str(root / "db"))
    assert from_checkpoint.result.levels == compressor.result.levels

    with pytest.raises(ValueError, match="different bit-widths"):
        compress(tokenizer, search="fixed", levels=str(path), granularity="fused")
    path.write_text("model.layers.0.self_attn.q_proj 3\n")
    with pytest.raises(ValueError, match="expected 'module.name: level'"):
        read_levels_file(path)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(bits=[1, 3]), ValueError, r"EvoPressConfig.bits: distinct bit-widths in 2..8"),
    (dict(bits=[2, 9]), ValueError, r"EvoPressConfig.bits"),
    (dict(bits=[3, 3]), ValueError, r"EvoPressConfig.bits"),
    (dict(bits=[3]), TypeError, r"EvoPressConfig.bits"),
    (dict(target=1.5), ValueError, r"EvoPressConfig.target: .* within the levels \[2, 8\]"),
    (dict(target=8.5), ValueError, r"EvoPressConfig.target"),
    (dict(group_size=0), ValueError, r"EvoPressConfig.group_size"),
    (dict(calibration_bits=5), ValueError, r"EvoPressConfig.calibration_bits"),
    (dict(search="uniform", target=3.5), ValueError, r"search='uniform' needs a target"),
    (dict(search="fixed"), ValueError, r"EvoPressConfig.levels"),
    (dict(levels={"a": 3}), ValueError, r"EvoPressConfig.levels"),
    (dict(mutation_rule="name"), ValueError, r"EvoPressConfig.mutation_rule"),
    (dict(granularity="sublayer"), ValueError, r"EvoPressConfig.granularity"),
    (dict(database_in_memory=False), ValueError, r"EvoPressConfig.database_in_memory"),
])
def test_bad_config_is_rejected_at_construction(overrides, error, match):
    with pytest.raises(error, match=match):
        quant_config(**overrides)


def test_bad_model_input_fails_before_work_and_writes_nothing(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"EvoPressConfig.group_size: 24 does not divide .* \[32, 64\]"):
        EvoPressCompressor(make_model(num_layers=4), tokenizer).compress(
            quant_config(group_size=24, database_dir=str(tmp_path / "db")), save_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "db").exists()

    class Conv1DLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(32, 64))

    model = make_model(num_layers=4)
    model.model.layers[2].mlp.down_proj = Conv1DLike()
    with pytest.raises(TypeError, match=r"model.layers.2.mlp.down_proj' \(Conv1DLike\) .* not an nn.Linear"):
        EvoPressCompressor(model, tokenizer).compress(quant_config(), save_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not os.listdir(tmp_path)


def test_variants_stream_from_disk_when_memory_is_short(quantized, tokenizer, monkeypatch):
    import psutil

    compressor, compressed, root = quantized

    class Tight:
        available = 1024

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    streamed, model = compress(tokenizer, target=2.5, database_dir=str(root / "db"))
    assert not streamed.method.variants_fit_in_memory() and not streamed.method.database.in_memory
    assert streamed.result.levels == compressor.result.levels
    assert torch.equal(logits(model), logits(compressed))


def level_space_of(num_layers, target, **overrides):
    config = quant_config(target=target, bits=[2, 3, 4, 5, 6, 8], **overrides)
    method = Quantization(make_model(num_layers=num_layers), config)
    return method, method.level_space()


@pytest.mark.parametrize("target", [6.5, 7.0])
def test_targets_near_the_uneven_6_to_8_step_build_a_space(target):
    # One Llama block: size groups of 2 (k, v), 2 (q, o) and 3 (gate, up, down) layers. 13 bits over two layers
    # needs 5 + 8, 21 over three needs 5 + 8 + 8: the greedy start alone missed both.
    method, space = level_space_of(1, target)
    assignment = space.feasible_assignment()
    assert space.is_valid(assignment)
    assert space.budget / method.num_weights <= target
    if target == 7.0:
        assert space.budget == 7 * method.num_weights


@pytest.mark.parametrize("target, mutation_rule", [(3.1, "size"), (3.1, "all"), (2.6, "size"), (5.3, "size"),
                                                   (6.5, "all")])
def test_fractional_targets_never_give_an_average_above_the_target(target, mutation_rule):
    method, space = level_space_of(3, target, mutation_rule=mutation_rule)
    assert space.budget / method.num_weights <= target
    assert space.is_valid(space.feasible_assignment())
    if target == 3.1:
        assert space.budget == 3 * method.num_weights  # rounding each size group gave 3.1296 before


def test_integer_targets_are_met_exactly_and_start_uniform():
    method, space = level_space_of(3, 4.0)
    assert space.budget == 4 * method.num_weights
    assert method._uniform(space) == (method.bits.index(4),) * space.num_units
