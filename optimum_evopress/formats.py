"""Checkpoint formats for quantized models, and the reference implementation's per-layer text format.

Mixed bit-widths are written as compressed-tensors `pack-quantized` (symmetric integers, one
config group per bit-width naming its modules exactly, `lm_head` and embeddings unquantized).
Plain `AutoModelForCausalLM.from_pretrained` loads such a checkpoint through its built-in
compressed-tensors support, and vLLM serves it when q/k/v and gate/up share their bit-width
(`granularity="fused"`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import types
from typing import Any

import torch

from .models import stored_weight

__all__ = ["quantization_config", "save_compressed_tensors", "attach_compressed_tensors_saving", "save_gptq",
           "check_gptq_export", "GPTQ_BITS", "read_levels_file", "write_levels_file", "load_levels", "SCALE_BUFFER"]

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


def _integers(weight: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """Our integers q of a quantized layer, exactly: its weight is q · scale rounded once to the model's dtype
    (a relative error of at most 2^-9, so |q| <= 128 is off by at most 1/4 before rounding)."""
    return torch.round(weight.double() / scale.double().repeat_interleave(group_size, 1))


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
        weight, scale = stored_weight(module), getattr(module, SCALE_BUFFER)
        size = group_size or weight.shape[1]
        # The packer rounds weight / scale in the weight's dtype, which in bfloat16 can miss an 8-bit integer by
        # one; q · scale in float32 is within 2^-23 of it, so it recovers our integers exactly.
        exact = _integers(weight, scale, size).float() * scale.float().repeat_interleave(size, 1)
        packed = PackedQuantizationCompressor.compress({"weight": exact, "weight_scale": scale.float()}, scheme)
        packed["weight_scale"] = scale  # stored in the model's dtype, as the model computes with it
        del state[f"{name}.weight"]
        state.update({f"{name}.{key}": value.contiguous() for key, value in packed.items()})
    return state


def save_compressed_tensors(model: torch.nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Writes `model` (quantized by EvoPress) as a compressed-tensors `pack-quantized` checkpoint.

    The in-memory model is left untouched: packing works on a copy of the state dict. As transformers does, only
    the main process writes: `is_main_process`, and rank 0 under torch.distributed.
    """
    import torch.distributed as dist
    from compressed_tensors.compressors import ModelCompressor
    from transformers import PreTrainedModel

    distributed = dist.is_available() and dist.is_initialized()
    if not kwargs.pop("is_main_process", True) or (distributed and dist.get_rank() != 0):
        return

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


# ---------------------------------------------------------------------- GPTQ format (GPTQModel, vLLM)
# Bit-widths GPTQ's packed int32 layout holds, and that GPTQModel's and vLLM's GPTQ kernels read.
GPTQ_BITS = (2, 3, 4, 8)


def check_gptq_export(bits: Any, shapes: dict[str, tuple[int, int]] | None = None) -> None:
    """Raises before any work when a GPTQ-format export cannot hold these levels or layers.

    `bits` are the bit-widths in use (or allowed); `shapes` maps layer names to (out, in) features.
    """
    unsupported = sorted(set(int(b) for b in bits) - set(GPTQ_BITS))
    if unsupported:
        raise ValueError(f"format='gptq': GPTQ's packed layout holds {list(GPTQ_BITS)} bits only, got "
                         f"{unsupported}; choose EvoPressConfig.bits within {list(GPTQ_BITS)} or save as "
                         f"compressed-tensors (every width from 2 to 8)")
    for name, (out_features, in_features) in (shapes or {}).items():
        if out_features % 32 or in_features % 32:
            raise ValueError(f"format='gptq': layer {name} has shape ({out_features}, {in_features}); GPTQ packs "
                             f"32 values per int32 word, so both sizes must be multiples of 32")
    # Found, not imported: gptqmodel is only imported when the checkpoint is written.
    if importlib.util.find_spec("gptqmodel") is None:
        raise ImportError("format='gptq' packs with gptqmodel: pip install 'optimum-evopress[gptq]' "
                          "(after `pip install torch==2.13.0` on CPU machines)")


@torch.no_grad()
def gptq_state_dict(model: torch.nn.Module, layer_bits: dict[str, int], group_size: int | None
                    ) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantized layer as GPTQ `qweight`/`qzeros`/`scales`/`g_idx`.

    Our symmetric integers q in [-2^(b-1), 2^(b-1) - 1] become GPTQ's unsigned q + 2^(b-1) with zero
    point 2^(b-1), which dequantize to the same values; GPTQModel's own packer writes the words and
    its v2 -> v1 conversion stores the zero points the way GPTQ checkpoints do (zero - 1).
    """
    from gptqmodel import QuantizeConfig  # noqa: PLC0415
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # noqa: PLC0415
    from gptqmodel.utils.model import convert_gptq_v2_to_v1_format_module  # noqa: PLC0415

    state = dict(model.state_dict())
    for name, bits in layer_bits.items():
        module = model.get_submodule(name)
        weight = stored_weight(module)
        out_features, in_features = weight.shape
        size = group_size or in_features
        # float16 scales; one that underflows there (an all-zero group) stays positive, so packing divides by it
        scale = getattr(module, SCALE_BUFFER).to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny).float()
        q = _integers(weight, getattr(module, SCALE_BUFFER), size)
        zero = 2 ** (bits - 1)
        # (q + zero) * scale is exact in float32 (8-bit integers times 11-bit fp16 mantissas), so the
        # packer's round((W + zero * scale) / scale) recovers q + zero exactly.
        source = types.SimpleNamespace(weight=(q.float() * scale.repeat_interleave(size, 1)), bias=None)
        packed = TorchLinear(bits=bits, group_size=size, sym=True, desc_act=False, in_features=in_features,
                             out_features=out_features, bias=False, register_buffers=False)
        packed.pack(source, scales=scale, zeros=torch.full_like(scale, zero),
                    g_idx=torch.arange(in_features, dtype=torch.int32) // size)
        convert_gptq_v2_to_v1_format_module(packed, QuantizeConfig(bits=bits, group_size=size, sym=True))
        del state[f"{name}.weight"]
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            state[f"{name}.{key}"] = getattr(packed, key).contiguous()
    return state


def gptq_quantization_config(layer_bits: dict[str, int], group_size: int | None) -> dict[str, Any]:
    """GPTQ `quantization_config`: the most common bit-width as `bits`, one exact-name `dynamic`
    override per layer at another width (read by GPTQModel and vLLM)."""
    counts: dict[int, int] = {}
    for bits in layer_bits.values():
        counts[bits] = counts.get(bits, 0) + 1
    base = max(sorted(counts), key=lambda b: counts[b])
    size = group_size or -1
    dynamic = {f"+:^{re.escape(name)}$": {"bits": bits, "group_size": size}
               for name, bits in sorted(layer_bits.items()) if bits != base}
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": base, "group_size": size,
            "desc_act": False, "sym": True, "lm_head": False, "pack_dtype": "int32", "dynamic": dynamic,
            "meta": {"quantizer": ["optimum-evopress"]}}


def save_gptq(model: torch.nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> None:
    """Writes `model` (quantized by EvoPress) as a GPTQ checkpoint with per-module `dynamic` bit-widths.

    GPTQModel (`GPTQModel.load`) and vLLM load it. GPTQ stores scales in float16: weights equal the
    in-memory model's exactly when its scales are float16-representable (a model compressed in float16; in
    bfloat16 all but scales below 2^-14, where float16 keeps fewer bits, i.e. groups whose largest weight is
    below about 1e-3 at 8 bits), otherwise within float16 rounding of the scales. The in-memory model is
    untouched.
    """
    from transformers import PreTrainedModel  # noqa: PLC0415

    record = getattr(model.config, "evopress", None)
    if not record or record.get("method") != "quantization":
        raise ValueError("save_gptq: the model was not quantized by EvoPress (config.evopress has no layer_bits)")
    layer_bits = {name: int(bits) for name, bits in record["layer_bits"].items()}
    check_gptq_export(layer_bits.values(),
                      {name: tuple(model.get_submodule(name).weight.shape) for name in layer_bits})
    state = gptq_state_dict(model, layer_bits, record["group_size"])
    config = gptq_quantization_config(layer_bits, record["group_size"])
    kwargs.pop("state_dict", None)
    saved = getattr(model.config, "quantization_config", None)
    model.config.quantization_config = config
    try:
        PreTrainedModel.save_pretrained(model, save_directory, state_dict=state, **kwargs)
    finally:
        if saved is None:
            del model.config.quantization_config
        else:
            model.config.quantization_config = saved
    with open(os.path.join(save_directory, "quantize_config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
        handle.write("\n")


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
