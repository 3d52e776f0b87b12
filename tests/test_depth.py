import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, reload_in_fresh_process
from optimum_evopress import EvoPressConfig
from optimum_evopress.methods import DepthPruning
from optimum_evopress.models import ARCHITECTURES

IDS = torch.randint(2, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def generate(model):
    with torch.no_grad():
        return model.generate(IDS[:1, :8], max_new_tokens=8, do_sample=False, use_cache=True,
                              pad_token_id=model.config.pad_token_id)


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_swaps_are_reversible_and_match_the_exported_model(granularity, tmp_path):
    paths, expected = [], {}
    for model_type in sorted(ARCHITECTURES):
        model = make_model(model_type)
        dense = logits(model)
        method = DepthPruning(model, EvoPressConfig(target=0.34, granularity=granularity))
        space = method.level_space()
        if granularity == "block":
            assignment = (0, 1, 0, 1, 0, 0)  # blocks 1 and 3
        else:  # attention of block 0, MLP of block 2, both halves of block 4
            assignment = (1, 0, 0, 0, 0, 1, 0, 0, 1, 1, 0, 0)
        assert space.cost(assignment) == space.budget
        method.set_levels(assignment)
        searched = logits(model)
        assert not torch.allclose(searched, dense)
        method.reset()
        torch.testing.assert_close(logits(model), dense, rtol=0, atol=0)
        method.set_levels(assignment)
        compressed = method.apply(assignment)
        torch.testing.assert_close(logits(compressed), searched, rtol=1e-5, atol=1e-5)
        assert compressed.config.num_hidden_layers == (4 if granularity == "block" else 5)
        layers = compressed.model.layers
        assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))
        if getattr(compressed.config, "layer_types", None) is not None:
            assert len(compressed.config.layer_types) == len(layers)
        if granularity == "sublayer":
            assert compressed.config.evopress["zeroed_attention_blocks"] == [0]
            assert compressed.config.evopress["zeroed_mlp_blocks"] == [2]
            assert compressed.config.evopress["removed_blocks"] == [4]
            assert torch.count_nonzero(layers[0].self_attn.o_proj.weight) == 0
        else:
            assert compressed.config.evopress["removed_blocks"] == [1, 3]
        expected[model_type] = (logits(compressed), generate(compressed))
        path = tmp_path / model_type
        compressed.save_pretrained(path)
        paths.append(path)
    reloaded = reload_in_fresh_process(paths, IDS, tmp_path)
    for model_type, path in zip(sorted(ARCHITECTURES), paths):
        torch.testing.assert_close(reloaded[str(path)]["logits"], expected[model_type][0], rtol=0, atol=0)
        assert torch.equal(reloaded[str(path)]["generated"], expected[model_type][1])


def test_gemma3_keeps_its_sliding_window_pattern():
    model = make_model("gemma3_text")
    types = list(model.config.layer_types)
    method = DepthPruning(model, EvoPressConfig(target=0.34))
    method.apply((0, 0, 0, 0, 1, 1))
    assert model.config.layer_types == types[:4]


def test_qwen2_keeps_which_blocks_use_sliding_windows():
    model = make_model("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=3)
    types = list(model.config.layer_types)
    assert types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    DepthPruning(model, EvoPressConfig(target=0.34)).apply((1, 0, 0, 1, 0, 0))  # blocks 0 and 3 removed
    kept = [types[i] for i in (1, 2, 4, 5)]
    assert model.config.layer_types == kept and model.config.max_window_layers == 2
    assert kept == ["full_attention" if i < model.config.max_window_layers else "sliding_attention" for i in range(4)]


def test_half_units_round_up_and_the_stated_range_holds():
    assert DepthPruning(make_model(num_layers=10), EvoPressConfig(target=0.25)).level_space().budget == 3
    assert DepthPruning(make_model(), EvoPressConfig(target=1 / 12)).level_space().budget == 1  # the range's low end
    with pytest.raises(ValueError, match=r"allowed range is \[0.0833, 0.9167\)"):
        DepthPruning(make_model(), EvoPressConfig(target=11 / 12)).level_space()


def test_unknown_architecture_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="gpt2.*not supported"):
        DepthPruning(model, EvoPressConfig())


@pytest.mark.parametrize("target, removed", [(0.01, 0), (0.99, 6)])
def test_targets_the_space_cannot_reach(target, removed):
    method = DepthPruning(make_model(), EvoPressConfig(target=target))
    with pytest.raises(ValueError, match=f"removes {removed}.*allowed range"):
        method.level_space()


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_residual_baselines(granularity):
    model = make_model(num_layers=8)
    method = DepthPruning(model, EvoPressConfig(target=0.25, granularity=granularity))
    space = method.level_space()
    calibration = torch.randint(2, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    shortgpt = method.run_baseline("shortgpt", space, calibration)
    window = method.run_baseline("sliding_window", space, calibration)
    assert space.is_valid(shortgpt) and space.is_valid(window)
    dropped = [i for i, level in enumerate(window) if level]
    assert dropped == list(range(dropped[0], dropped[0] + space.budget))  # one contiguous run
    # The search-time swaps are undone: the model is dense again.
    assert all(a == (False, False) for a in method._state)
    influence, angles = method._residual_statistics(calibration, space.budget)
    assert shortgpt == tuple(int(i in sorted(range(len(influence)), key=influence.__getitem__)[:space.budget])
                             for i in range(space.num_units))
    # The statistics are those of the hidden states at the unit boundaries, computed without the output head.
    with torch.no_grad():
        states = [h.float() for h in model(input_ids=calibration, output_hidden_states=True).hidden_states[:-1]]
    states.append(_last_block_output(model, calibration))
    if granularity == "block":
        expected = [float((1 - F.cosine_similarity(a, b, dim=-1)).mean()) for a, b in zip(states, states[1:])]
        assert influence == pytest.approx(expected, rel=1e-5)
        cos = F.cosine_similarity(states[0], states[space.budget], dim=-1).clamp(-1, 1)
        assert angles[0] == pytest.approx(float((torch.arccos(cos) / math.pi).mean()), rel=1e-5)
    handle = model.lm_head.register_forward_hook(lambda *args: pytest.fail("ran the output head"))
    try:
        method._residual_statistics(calibration, space.budget)
    finally:
        handle.remove()


def _last_block_output(model, calibration):
    """The last block's output (the model's last hidden state is after the final norm)."""
    captured = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            model(input_ids=calibration)
    finally:
        handle.remove()
    return captured[0].float()
