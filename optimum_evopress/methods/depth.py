"""Depth pruning: removing whole transformer blocks, or their attention and MLP sub-blocks separately.

During the search a removed unit is swapped for a stand-in module that passes the residual stream
through (no weights are copied; the original module is kept and swapped back). The chosen assignment
is exported as a standard checkpoint: removed blocks are deleted and the rest renumbered; a removed
attention or MLP sub-block alone has its output projection zeroed, which gives identical outputs.
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import find_decoder, input_device, set_weight, stored_weight
from ..search.baselines import rank_to_assignment
from ..search.space import Assignment, LevelSpace
from .base import CompressionMethod, register_method

__all__ = ["DepthPruning"]

KEPT, DROPPED = "kept", "dropped"


class _SkippedBlock(nn.Module):
    """Stands in for a removed decoder block: the residual stream passes unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class _ZeroAttention(nn.Module):
    """Stands in for a removed attention sub-block: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(hidden_states), None


class _ZeroMLP(nn.Module):
    """Stands in for a removed MLP sub-block: adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


# Per-layer config lists that must follow the blocks when some are removed.
_PER_LAYER_LISTS = ("layer_types", "no_rope_layers")
_LAYER_INDEX_LISTS = ("mlp_only_layers",)


class DepthPruning(CompressionMethod):
    """Removes a fraction `target` of the model's blocks (`granularity="block"`) or of its attention and
    MLP sub-blocks counted together (`granularity="sublayer"`, as in the EvoPress paper)."""

    granularities = ("block", "sublayer")
    baselines = ("shortgpt", "sliding_window")

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.path, self.layers, self.arch = find_decoder(model)
        self.blocks = list(self.layers)
        self.attentions = [getattr(block, self.arch.attention) for block in self.blocks]
        self.mlps = [getattr(block, self.arch.mlp) for block in self.blocks]
        self._skipped = _SkippedBlock()
        self._zero_attention = _ZeroAttention()
        self._zero_mlp = _ZeroMLP()
        self._state = [(False, False)] * len(self.blocks)  # (attention dropped, mlp dropped) per block

    # ------------------------------------------------------------------ configuration
    @classmethod
    def validate_config(cls, config: Any) -> None:
        super().validate_config(config)
        if not 0.0 < config.target < 1.0:
            raise ValueError(f"EvoPressConfig.target: for method 'depth' the fraction of units removed must be in "
                             f"(0, 1), got {config.target}")

    @classmethod
    def default_settings(cls, preset: str, space: LevelSpace | None = None) -> dict[str, Any]:
        if preset == "paper":
            settings = dict(offspring=32, survivors_per_selection=[2, 1], tokens_per_selection=[2048, 32768],
                            initial_candidates=16, calibration_tokens=65536, sequence_length=8192)
        else:
            settings = dict(offspring=16, survivors_per_selection=[2, 1], tokens_per_selection=[256, 2048],
                            initial_candidates=16, calibration_tokens=8192, sequence_length=256)
        if space is not None:
            n, k = space.num_units, space.budget
            # The paper runs k(n-k)/1.5 generations; the CPU preset caps them to stay within minutes.
            generations = max(1, math.ceil(k * (n - k) / 1.5))
            settings["generations"] = generations if preset == "paper" else min(generations, 40)
        return settings

    # ------------------------------------------------------------------ search space
    def unit_names(self) -> list[str]:
        if self.granularity == "block":
            return [f"{self.path}.{i}" for i in range(len(self.blocks))]
        return [f"{self.path}.{i}.{name}" for i in range(len(self.blocks)) for name in (self.arch.attention,
                                                                                      self.arch.mlp)]

    def unit_blocks(self) -> list[int]:
        per_block = 1 if self.granularity == "block" else 2
        return [i // per_block for i in range(len(self.unit_names()))]

    def level_space(self) -> LevelSpace:
        units = self.unit_names()
        budget = math.floor(self.config.target * len(units) + 0.5)  # halves round up: 0.25 of 10 blocks is 3
        if not 1 <= budget <= len(units) - 1:
            raise ValueError(
                f"EvoPressConfig.target: {self.config.target} of {len(units)} {self.granularity} units removes "
                f"{budget}; at least 1 and at most {len(units) - 1} must be removed, so the allowed range is "
                f"[{0.5 / len(units):.4f}, {1 - 0.5 / len(units):.4f})"
            )
        return LevelSpace(units=units, levels=[(KEPT, DROPPED)] * len(units), costs=[(0, 1)] * len(units),
                          budget=budget)

    def _block_states(self, assignment: Sequence[int]) -> list[tuple[bool, bool]]:
        if self.granularity == "block":
            return [(bool(level), bool(level)) for level in assignment]
        return [(bool(assignment[2 * i]), bool(assignment[2 * i + 1])) for i in range(len(self.blocks))]

    # ------------------------------------------------------------------ swapping
    def set_levels(self, assignment: Sequence[int]) -> None:
        self._set_states(self._block_states(assignment))

    def _set_states(self, states: Sequence[tuple[bool, bool]]) -> None:
        for i, state in enumerate(states):
            if state == self._state[i]:
                continue
            attention_dropped, mlp_dropped = state
            block = self.blocks[i]
            self.layers[i] = self._skipped if attention_dropped and mlp_dropped else block
            setattr(block, self.arch.attention, self._zero_attention if attention_dropped else self.attentions[i])
            setattr(block, self.arch.mlp, self._zero_mlp if mlp_dropped else self.mlps[i])
            self._state[i] = state

    @contextlib.contextmanager
    def stacked(self, assignments: Sequence[Assignment]) -> Iterator[None]:
        """A sub-block runs when any part keeps it; a forward hook zeroes its output in the rows of the parts that
        drop it, which adds nothing to their residual stream, exactly as the stand-ins do."""
        parts = [self._block_states(assignment) for assignment in assignments]
        shared = [tuple(all(states[i][j] for states in parts) for j in range(2)) for i in range(len(self.blocks))]
        self._set_states(shared)
        handles = []
        for i in range(len(self.blocks)):
            for j, module in enumerate((self.attentions[i], self.mlps[i])):
                dropping = [part for part, states in enumerate(parts) if states[i][j]]
                if dropping and not shared[i][j]:
                    handles.append(module.register_forward_hook(_zero_parts(dropping, len(parts))))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def reset(self) -> None:
        self.set_levels([0] * len(self.unit_names()))

    # ------------------------------------------------------------------ export
    def apply(self, assignment: Assignment) -> nn.Module:
        """Removes dropped blocks (renumbering the rest) and zeroes the output projection of dropped sub-blocks."""
        states = self._block_states(assignment)
        self.reset()
        removed = [i for i, (attn, mlp) in enumerate(states) if attn and mlp]
        zeroed = {"attention": [i for i, (attn, mlp) in enumerate(states) if attn and not mlp],
                  "mlp": [i for i, (attn, mlp) in enumerate(states) if mlp and not attn]}
        with torch.no_grad():
            for i in zeroed["attention"]:
                _zero_linear(getattr(self.attentions[i], self.arch.attention_output))
            for i in zeroed["mlp"]:
                _zero_linear(getattr(self.mlps[i], self.arch.mlp_output))
        if removed:
            self._remove_blocks(removed)
        self.model.config.evopress = {
            "method": "depth",
            "granularity": self.granularity,
            "original_num_hidden_layers": len(self.blocks),
            "removed_blocks": removed,
            "zeroed_attention_blocks": zeroed["attention"],
            "zeroed_mlp_blocks": zeroed["mlp"],
        }
        return self.model

    def _remove_blocks(self, removed: list[int]) -> None:
        config = self.model.config
        old_count = len(self.blocks)
        kept = [i for i in range(old_count) if i not in set(removed)]
        new_index = {old: new for new, old in enumerate(kept)}
        parent_path, _, attribute = self.path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        setattr(parent, attribute, nn.ModuleList([self.blocks[i] for i in kept]))
        for new, old in enumerate(kept):
            for module in self.blocks[old].modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new
        config.num_hidden_layers = len(kept)
        for name in _PER_LAYER_LISTS:
            values = getattr(config, name, None)
            if isinstance(values, (list, tuple)) and len(values) == old_count:
                setattr(config, name, [values[i] for i in kept])
        for name in _LAYER_INDEX_LISTS:
            values = getattr(config, name, None)
            if isinstance(values, (list, tuple)):
                setattr(config, name, [new_index[i] for i in values if i in new_index])
        # Qwen2/Qwen3: blocks from `max_window_layers` on use sliding windows; kept blocks keep their order.
        if isinstance(getattr(config, "max_window_layers", None), int):
            config.max_window_layers = sum(1 for old in kept if old < config.max_window_layers)

    # ------------------------------------------------------------------ baselines
    def run_baseline(self, name: str, space: LevelSpace, calibration: torch.Tensor) -> Assignment:
        """`shortgpt`: remove the units with the lowest block influence (1 - cos(input, output)).
        `sliding_window`: remove the contiguous run of units whose input and output are closest in angle."""
        if name not in self.baselines:
            return super().run_baseline(name, space, calibration)
        influence, window = self._residual_statistics(calibration, space.budget)
        if name == "shortgpt":
            return rank_to_assignment(space, influence)
        start = min(range(len(window)), key=lambda s: window[s])
        assignment = [0] * space.num_units
        for unit in range(start, start + space.budget):
            assignment[unit] = 1
        return tuple(assignment)

    @torch.no_grad()
    def _residual_statistics(self, calibration: torch.Tensor, window_size: int) -> tuple[list[float], list[float]]:
        """Mean per-token block influence of each unit, and mean angular distance across each window of units.

        The residual stream's states at the unit boundaries are taken as the forward pass reaches them and
        compared at once, so at most `window_size` of them are held (on the input device); the output head
        is not run.
        """
        self.reset()
        n_units = len(self.unit_names())
        influence = torch.zeros(n_units, dtype=torch.float64)
        window = torch.zeros(n_units - window_size + 1, dtype=torch.float64)
        device = input_device(self.model)
        recent: collections.deque[torch.Tensor] = collections.deque(maxlen=window_size)
        count = [0]  # boundaries reached in this forward pass

        def reached(hidden: torch.Tensor) -> None:
            hidden = hidden.to(device, torch.float32)
            b = count[0]
            if b >= 1:
                influence[b - 1] += (1 - F.cosine_similarity(recent[-1], hidden, dim=-1)).sum().item()
            if b >= window_size:  # recent[-k] is boundary b - k
                cos = F.cosine_similarity(recent[-window_size], hidden, dim=-1).clamp(-1, 1)
                window[b - window_size] += (torch.arccos(cos) / math.pi).sum().item()
            recent.append(hidden)
            count[0] += 1

        hooks = [self.blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: reached(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)]
        for block in self.blocks:
            if self.granularity == "sublayer":
                hooks.append(getattr(block, self.arch.mlp_input_norm).register_forward_pre_hook(
                    lambda module, args, kwargs: reached(args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            hooks.append(block.register_forward_hook(
                lambda module, args, output: reached(output[0] if isinstance(output, tuple) else output)))
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model
        tokens = 0
        try:
            for start in range(0, len(calibration), self.config.batch_size):
                batch = calibration[start:start + self.config.batch_size].to(device)
                recent.clear()
                count[0] = 0
                decoder(input_ids=batch, use_cache=False)
                tokens += batch.numel()
        finally:
            for hook in hooks:
                hook.remove()
        return (influence / tokens).tolist(), (window / tokens).tolist()


def _zero_parts(dropping: list[int], num_parts: int):
    """A sub-block's forward hook that zeroes its output (the first element of a tuple) in the given parts of the batch."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        rows = hidden.shape[0] // num_parts
        for part in dropping:
            hidden[part * rows:(part + 1) * rows] = 0
        return output

    return hook


def _zero_linear(linear: nn.Module) -> None:
    """Zeroes a layer's weight and bias, also where accelerate offloads them (to the CPU or disk)."""
    for name in ("weight", "bias"):
        value = stored_weight(linear, name)
        if value is not None:
            set_weight(linear, torch.zeros_like(value), name)


register_method("depth", DepthPruning)
