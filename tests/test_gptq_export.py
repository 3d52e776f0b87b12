"""GPTQ-format export (per-module `dynamic` bit-widths), and its refusals before any work.

The export packs with gptqmodel (the `[gptq]` extra); where it is not installed, the tests that load
a GPTQ checkpoint skip, and the refusals are still tested.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import corpus, make_model
from optimum_evopress import EvoPressCompressor, EvoPressConfig

# Every linear layer's sizes are multiples of 32, as GPTQ's int32 words need.
SHAPES = dict(hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4, num_key_value_heads=2)


def config(**overrides):
    settings = dict(method="quantization", target=3.0, bits=[2, 3, 4, 8], group_size=32, calibration_dataset=corpus(),
                    generations=3, offspring=4, survivors_per_selection=[2, 1], tokens_per_selection=[64, 256],
                    calibration_tokens=512, sequence_length=32, evaluation_tokens=0, initial_candidates=4, seed=0,
                    dtype="bfloat16")
    settings.update(overrides)
    return EvoPressConfig(**settings)


def test_bits_gptq_cannot_hold_are_refused_before_work(tokenizer, tmp_path, monkeypatch):
    compressor = EvoPressCompressor(make_model(num_layers=2, **SHAPES), tokenizer)
    monkeypatch.setattr("optimum_evopress.compressor.prepare_token_data",
                        lambda *a, **k: pytest.fail("data was prepared before the format was checked"))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"holds \[2, 3, 4, 8\] bits only, got \[5, 6\]"):
        compressor.compress(config(bits=[2, 3, 4, 5, 6]), save_dir=out, format="gptq", progress=False)
    with pytest.raises(ValueError, match="format: one of"):
        compressor.compress(config(), save_dir=out, format="gguf", progress=False)
    with pytest.raises(ValueError, match="applies to method='quantization'"):
        compressor.compress(EvoPressConfig(method="depth", target=0.25), save_dir=out, format="gptq")
    assert not out.exists()


def test_layers_that_do_not_fill_int32_words_are_refused(tokenizer, tmp_path):
    compressor = EvoPressCompressor(make_model(num_layers=2), tokenizer)  # k/v projections have 16 outputs
    with pytest.raises(ValueError, match=r"k_proj has shape \(16, 32\).*multiples of 32"):
        compressor.compress(config(group_size=16), save_dir=tmp_path / "out", format="gptq", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_gptqmodel_names_the_extra(tokenizer, tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "gptqmodel" else spec(name, *a))
    compressor = EvoPressCompressor(make_model(num_layers=2, **SHAPES), tokenizer)
    with pytest.raises(ImportError, match=r"optimum-evopress\[gptq\]"):
        compressor.compress(config(), save_dir=tmp_path / "out", format="gptq", progress=False)
    assert not (tmp_path / "out").exists()


def test_saving_a_compressed_model_with_six_bit_layers_as_gptq_writes_nothing(tokenizer, tmp_path):
    compressor = EvoPressCompressor(make_model(num_layers=2, **SHAPES), tokenizer)
    compressor.compress(config(bits=[4, 6], target=5.0, generations=1), progress=False)
    assert 6 in set(compressor.model.config.evopress["layer_bits"].values())
    with pytest.raises(ValueError, match=r"got \[6\]"):
        compressor.save_pretrained(tmp_path / "out", format="gptq")
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


_LOAD_WITH_GPTQMODEL = r"""
import json, sys, torch
from gptqmodel import BACKEND, GPTQModel
expected = torch.load(sys.argv[1])
model = GPTQModel.load(sys.argv[2], backend=BACKEND.TORCH, device="cpu")
hf = model.model
assert "optimum_evopress" not in sys.modules
weights_equal = {}
for name, weight in expected["weights"].items():
    module = hf.get_submodule(name)
    weights_equal[name] = [int(module.bits), bool(torch.equal(module.dequantize_weight().T.to(weight.dtype), weight))]
with torch.no_grad():
    logits = hf(input_ids=expected["ids"]).logits
    generated = hf.generate(expected["ids"][:1, :8], max_new_tokens=4, do_sample=False)
torch.save({"logits": logits, "weights_equal": weights_equal, "generated": generated}, sys.argv[3])
"""


def test_gptq_checkpoint_loads_in_gptqmodel_with_the_same_weights(tokenizer, tmp_path):
    pytest.importorskip("gptqmodel")
    compressor = EvoPressCompressor(make_model(num_layers=3, **SHAPES), tokenizer)
    compressed = compressor.compress(config(), save_dir=tmp_path / "gptq", format="gptq", progress=False)
    layer_bits = compressed.config.evopress["layer_bits"]
    assert len(set(layer_bits.values())) > 1, "the test needs mixed bit-widths"

    quantize_config = json.loads((tmp_path / "gptq" / "quantize_config.json").read_text())
    model_config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    assert model_config["quantization_config"] == quantize_config
    base = quantize_config["bits"]
    assert quantize_config["group_size"] == 32 and quantize_config["sym"] and not quantize_config["desc_act"]
    overrides = {pattern[len("+:^"):-1].replace("\\", ""): spec["bits"]
                 for pattern, spec in quantize_config["dynamic"].items()}
    assert overrides == {name: bits for name, bits in layer_bits.items() if bits != base}
    record = json.loads((tmp_path / "gptq" / "evopress_config.json").read_text())
    assert record["format"] == "gptq"
    assert "quantization_config" not in compressed.config.to_dict()  # the in-memory model is left as it was

    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = compressed(input_ids=ids).logits
    weights = {name: compressed.get_submodule(name).weight.detach().clone() for name in layer_bits}
    torch.save({"ids": ids, "weights": weights}, tmp_path / "expected.pt")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", _LOAD_WITH_GPTQMODEL, str(tmp_path / "expected.pt"), str(tmp_path / "gptq"),
                    str(tmp_path / "loaded.pt")], check=True, env=env, capture_output=True)
    loaded = torch.load(tmp_path / "loaded.pt")
    assert loaded["weights_equal"] == {name: [bits, True] for name, bits in layer_bits.items()}
    # Same weights; GPTQModel's kernel multiplies by the transposed weight, so bf16 sums round differently.
    torch.testing.assert_close(loaded["logits"].float(), expected.float(), atol=0.15, rtol=0.05)
    assert loaded["generated"].shape == (1, 12)
