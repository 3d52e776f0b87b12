"""Unstructured sparsity end to end on tiny models: exact budget, database, export, baselines, sparse + quantized, bad input."""

import json
import os

import pytest
import torch

from conftest import corpus, input_ids, logits, make_model, reload_in_fresh_process
from optimum_evopress import EvoPressCompressor, EvoPressConfig
from optimum_evopress.methods.sparsity import Sparsity, owl_sparsities
from optimum_evopress.search.baselines import closest_assignment
from optimum_evopress.search.space import LevelSpace


def sparse_config(**overrides):
    settings = dict(method="sparsity", target=0.6, calibration_dataset=corpus(), generations=6, offspring=4,
                    survivors_per_selection=[2, 1], tokens_per_selection=[64, 256], calibration_tokens=512,
                    sequence_length=32, evaluation_tokens=0, initial_candidates=4, seed=0)
    settings.update(overrides)
    return EvoPressConfig(**settings)


def compress(tokenizer, model=None, **overrides):
    compressor = EvoPressCompressor(model if model is not None else make_model(num_layers=4), tokenizer)
    compressed = compressor.compress(sparse_config(**overrides), progress=False)
    return compressor, compressed


def zeros_per_layer(compressor):
    return {name: int((m.weight == 0).sum()) for name, m in compressor.method.linears.items()}


@pytest.fixture(scope="module")
def pruned(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    compressor, compressed = compress(tokenizer, database_dir=str(root / "db"))
    compressor.save_pretrained(root / "out")
    return compressor, compressed, root


def test_zero_budget_is_met_exactly_with_one_weight_step_per_level(pruned):
    compressor, compressed, _ = pruned
    method, result = compressor.method, compressor.result
    zeros = zeros_per_layer(compressor)
    assert sum(zeros.values()) == result.budget["budget"] == result.budget["cost"]
    assert result.budget["budget"] == sum(round(0.6 * m.weight.numel()) for m in method.linears.values())
    offsets = set()
    for name, count in zeros.items():
        offset, remainder = divmod(count - method.base[name], method.step)
        assert remainder == 0  # every layer sits on its grid: round(target * n) + k * step zeros
        offsets.add(offset)
    assert len(offsets) > 1, "the search should move layers off the uniform level"
    record = compressed.config.evopress
    assert record["method"] == "sparsity" and record["average_sparsity"] == pytest.approx(result.budget["cost"] / method.num_weights)
    assert all(record["layer_sparsity"][n] == zeros[n] / method.linears[n].weight.numel() for n in zeros)


def test_reloaded_checkpoint_has_the_same_zeros_and_logits(pruned, tmp_path):
    compressor, compressed, root = pruned
    out = reload_in_fresh_process([root / "out"], input_ids(), tmp_path)[str(root / "out")]
    assert torch.equal(out["logits"], logits(compressed))
    from safetensors.torch import load_file

    state = load_file(root / "out" / "model.safetensors")
    layer_sparsity = json.loads((root / "out" / "config.json").read_text())["evopress"]["layer_sparsity"]
    for name, sparsity in layer_sparsity.items():
        weight = state[f"{name}.weight"]
        assert float((weight == 0).sum()) / weight.numel() == sparsity
    record = json.loads((root / "out" / "evopress_config.json").read_text())
    assert record["levels"] == compressor.result.levels


def test_database_is_reused_and_streams_from_disk(pruned, tokenizer, monkeypatch):
    compressor, compressed, root = pruned
    monkeypatch.setattr(Sparsity, "_build_database", lambda *a, **k: pytest.fail("the database was rebuilt"))
    again, model = compress(tokenizer, database_dir=str(root / "db"), database_in_memory=False)
    assert again.result.levels == compressor.result.levels
    assert torch.equal(logits(model), logits(compressed))
    with pytest.raises(ValueError, match=r"other settings \(target: database has 0.6, asked for 0.7\)"):
        compress(tokenizer, target=0.7, database_dir=str(root / "db"))


def test_fixed_levels_reproduce_the_result(pruned, tokenizer):
    compressor, compressed, root = pruned
    fixed, model = compress(tokenizer, search="fixed", levels=compressor.result.levels, database_dir=str(root / "db"))
    assert torch.equal(logits(model), logits(compressed))


def test_baselines_meet_the_budget(pruned, tokenizer):
    _, _, root = pruned
    results = {}
    for search in ("uniform", "dynamic_programming", "owl"):
        compressor, _ = compress(tokenizer, search=search, database_dir=str(root / "db"))
        assert compressor.result.budget["cost"] == compressor.result.budget["budget"]
        results[search] = compressor
    uniform = results["uniform"]
    assert all(z == uniform.method.base[n] for n, z in zeros_per_layer(uniform).items())
    owl = results["owl"].result
    assert owl.fitness == min(owl.history[0]["candidate_scores"]) and len(owl.history[0]["candidate_scores"]) > 1


def test_size_groups_keep_their_own_budget_and_block_granularity(tokenizer):
    compressor, _ = compress(tokenizer, mutation_rule="size", generations=3)
    space = compressor.method.level_space()
    assert space.groups is not None and len(space.group_budgets) == 3  # three layer sizes in the tiny Llama
    zeros = zeros_per_layer(compressor)
    for size in {m.weight.numel() for m in compressor.method.linears.values()}:
        names = [n for n, m in compressor.method.linears.items() if m.weight.numel() == size]
        assert sum(zeros[n] for n in names) == sum(compressor.method.base[n] for n in names)
    block, _ = compress(tokenizer, granularity="block", generations=3)
    assert len(block.result.levels) == 4
    zeros = zeros_per_layer(block)
    for unit in block.result.levels:  # every layer of a block is on the same step
        offsets = {(zeros[n] - block.method.base[n]) // block.method.step for n in zeros if n.startswith(unit + ".")}
        assert len(offsets) == 1


def test_pruned_then_quantized_keeps_its_zeros_through_compressed_tensors(pruned, tokenizer, tmp_path):
    _, _, root = pruned
    sparse, model = compress(tokenizer, search="uniform", database_dir=str(root / "db"))
    pruned_masks = {name: m.weight == 0 for name, m in sparse.method.linears.items()}
    quantizer = EvoPressCompressor(model, tokenizer)
    quantized = quantizer.compress(EvoPressConfig(
        method="quantization", target=4.0, bits=[3, 4, 8], group_size=16, keep_zeros=True, search="uniform",
        calibration_dataset=corpus(), calibration_tokens=512, sequence_length=32, evaluation_tokens=0,
        tokens_per_selection=[256], survivors_per_selection=[1]), progress=False)
    for name, module in quantizer.method.linears.items():  # every pruned weight is still exactly zero
        assert bool((module.weight[pruned_masks[name]] == 0).all())
    quantizer.save_pretrained(tmp_path / "sparse-int4")
    out = reload_in_fresh_process([tmp_path / "sparse-int4"], input_ids(), tmp_path)[str(tmp_path / "sparse-int4")]
    assert torch.equal(out["logits"], logits(quantized))
    record = json.loads((tmp_path / "sparse-int4" / "config.json").read_text())
    assert record["quantization_config"]["format"] == "pack-quantized"
    # the pruned zeros, not the weights that also quantized to 0
    assert all(record["evopress"]["layer_sparsity"][n] == float(pruned_masks[n].float().mean())
               for n in pruned_masks)


def test_owl_gives_outlier_rich_blocks_lower_sparsity():
    g = torch.Generator().manual_seed(0)
    calm = torch.rand(1000, generator=g)
    spiky = torch.cat([torch.rand(950, generator=g), 50 * torch.rand(50, generator=g) + 20])
    sparsities = owl_sparsities([calm, spiky, calm], target=0.6, lam=0.08, threshold=5)
    assert sparsities.mean() == pytest.approx(0.6)
    assert sparsities[1] == pytest.approx(0.6 - 2 * 0.08 * 2 / 3) and sparsities[0] == sparsities[2] > 0.6


def test_closest_assignment_meets_the_budget_near_the_wish():
    space = LevelSpace(["a", "b", "c"], [[0, 1, 2, 3]] * 3, [[0, 10, 20, 30]] * 3, budget=30)
    assert closest_assignment(space, [31, 0, 0]) == (3, 0, 0)
    assert closest_assignment(space, [14, 14, 14]) == (1, 1, 1)
    assert space.is_valid(closest_assignment(space, [26, 26, 0]))


@pytest.mark.parametrize("overrides, match", [
    (dict(target=0.0), r"EvoPressConfig.target: .* in \(0, 1\)"),
    (dict(target=1.0), r"EvoPressConfig.target: .* in \(0, 1\)"),
    (dict(sparsity_levels=0), r"EvoPressConfig.sparsity_levels: an int in \[1, 64\]"),
    (dict(sparsity_step=0), r"EvoPressConfig.sparsity_step: a positive int"),
    (dict(granularity="fused"), r"EvoPressConfig.granularity"),
])
def test_bad_config_is_rejected_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        sparse_config(**overrides)


def test_grids_layers_cannot_take_fail_before_work_and_write_nothing(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("optimum_evopress.compressor.prepare_token_data",
                        lambda *a, **k: pytest.fail("data was prepared before the levels were checked"))
    compressor = EvoPressCompressor(make_model(num_layers=2), tokenizer)
    with pytest.raises(ValueError, match=r"sparsity_step: 5000 weights per step leave unit .* with a single level"):
        compressor.compress(sparse_config(sparsity_step=5000), save_dir=tmp_path / "out")
    with pytest.raises(ValueError, match=r"target: 0.9999 leaves no weight in layer model.layers.0.self_attn.q_proj"):
        compressor.compress(sparse_config(target=0.9999), save_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []
