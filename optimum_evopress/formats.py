"""Checkpoint formats for quantized models, and the reference implementation's per-layer text format.

Mixed bit-widths are written as compressed-tensors `pack-quantized` (symmetric integers, one
config group per bit-width naming its modules exactly, `lm_head` and embeddings unquantized).
Plain `AutoModelForCausalLM.from_pretrained` loads such a checkpoint through its built-in
compressed-tensors support, and vLLM serves it when q/k/v and gate/up share their bit-width
(`granularity="fused"`).
"""

from __future__ import annotations

import json
import os
import re
import types
from typing import Any

import torch

__all__ = ["quantization_config", "save_compressed_tensors", "attach_compressed_tensors_saving",
           "read_levels_file", "write_levels_file", "load_levels", "SCALE_BUFFER"]

# Non-persistent buffer holding a quantized linear layer's per-group scales in memory.
SCALE_BUFFER = "evopress_weight_scale"


def _scheme_args(bits: int, group_size: int | None) -> dict[str, Any]:
    return {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "group" if group_size else "channel", "group_size": group_size}


def quantization_config(layer_bits: dict[str, int], group_size: int | None) -> Any:
    """A compressed-tensors `QuantizationConfig`: one config group per bit-width, targets named exactly."""
    from compressed_tensors.quantization import QuantizationConfig

    groups = {}
    for i, bits in enumerate(sorted(set(layer_bits.values()))):
        targets = [f"re:^{re.escape(name)}$" for name, b in sorted(layer_bits.items()) if b == bits]
        groups[f"group_{i}"] = {"targets": targets, "weights": _scheme_args(bits, group_size)}
    return QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                              ignore=["lm_head"])


@torch.no_grad()
def compressed_state_dict(model: torch.nn.Module, layer_bits: dict[str, int], group_size: int | None
                          ) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantized linear layer packed by compressed-tensors."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    state = dict(model.state_dict())
    for name, bits in layer_bits.items():
        module = model.get_submodule(name)
        scheme = QuantizationScheme(targets=[name], weights=QuantizationArgs(**_scheme_args(bits, group_size)))
        packed = PackedQuantizationCompressor.compress(
            {"weight": module.weight.detach(), "weight_scale": getattr(module, SCALE_BUFFER)}, scheme)
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": value.contiguous() for key, value in packed.items()})
    return state


def save_compressed_tensors(model: torch.nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Writes `model` (quantized by EvoPress) as a compressed-tensors `pack-quantized` checkpoint.

    The in-memory model is left untouched: packing works on a copy of the state dict.
    """
    from compressed_tensors.compressors import ModelCompressor
    from transformers import PreTrainedModel

    record = model.config.evopress
    layer_bits = {name: int(bits) for name, bits in record["layer_bits"].items()}
    state = compressed_state_dict(model, layer_bits, record["group_size"])
    kwargs.pop("state_dict", None)
    PreTrainedModel.save_pretrained(model, save_directory, state_dict=state, **kwargs)
    ModelCompressor(quantization_config=quantization_config(layer_bits, record["group_size"])).update_config(
        os.fspath(save_directory))


def attach_compressed_tensors_saving(model: torch.nn.Module) -> None:
    """Makes `model.save_pretrained` (and so `push_to_hub`) write the compressed-tensors checkpoint."""
    model.save_pretrained = types.MethodType(save_compressed_tensors, model)


# ---------------------------------------------------------------------- reference text format
def read_levels_file(path: str | os.PathLike) -> dict[str, int | float | str]:
    """Reads per-layer levels written one per line as `model.layers.0.mlp.down_proj: 3` (the reference
    implementation's format); numbers become int or float, blank lines and `#` comments are skipped."""
    levels: dict[str, int | float | str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, value = line.rpartition(":")
            if not sep or not name.strip() or not value.strip():
                raise ValueError(f"{path}:{number}: expected 'module.name: level', got {line!r}")
            value = value.strip()
            try:
                parsed: int | float | str = int(value)
            except ValueError:
                try:
                    parsed = float(value)
                except ValueError:
                    parsed = value
            levels[name.strip()] = parsed
    if not levels:
        raise ValueError(f"{path}: no levels found")
    return levels


def write_levels_file(levels: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes `{module name: level}` one per line as `name: level`, the reference implementation's format."""
    with open(path, "w", encoding="utf-8") as handle:
        for name, level in levels.items():
            handle.write(f"{name}: {level}\n")


def load_levels(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Levels from a dict, an `evopress_config.json` (its `levels`), a JSON dict, or a `name: level` text file."""
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        levels = data.get("levels", data) if isinstance(data, dict) else None
        if not isinstance(levels, dict) or not levels:
            raise ValueError(f"EvoPressConfig.levels: {path} holds no `levels` dict")
        return levels
    return read_levels_file(path)
