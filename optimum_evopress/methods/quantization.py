"""Quantization: every linear layer (or fused group, or block) at its own GPTQ bit-width.

`build` collects each linear layer's Hessian block by block from calibration activations and
solves GPTQ for every bit-width of the level set from that one Hessian; the variants go to a
`VariantDatabase` (memory, or a directory that later runs reuse). During the search a layer is put
at a bit-width by pointing its weight at the dequantized variant (no copy). The result exports as
a compressed-tensors `pack-quantized` checkpoint that plain transformers loads.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from ..formats import SCALE_BUFFER, attach_compressed_tensors_saving
from ..gptq import dequantize, gptq_quantize
from ..models import stored_weight
from ..search.space import Assignment, LevelSpace
from .base import register_method
from .layerwise import FUSED_GROUPS, LayerwiseMethod

__all__ = ["Quantization", "SUPPORTED_BITS", "FUSED_GROUPS"]

logger = logging.getLogger(__name__)

SUPPORTED_BITS = range(2, 9)  # what compressed-tensors pack-quantized can represent


class Quantization(LayerwiseMethod):
    """Mixed-precision GPTQ at an average bit-width `target` over the decoder's linear layers.

    Units are single linear layers (`granularity="linear"`, as in the paper), fused groups whose
    members share a bit-width so vLLM can serve the model (`"fused"`: q/k/v, gate/up), or whole
    blocks (`"block"`). The budget is the total number of weight bits; with `mutation_rule="size"`
    bits are only exchanged between units of equal size, so every size group keeps its own budget: the
    most whole bits per unit whose average does not exceed `target`.
    """

    baselines = ("uniform", "dynamic_programming")

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.bits = sorted(config.bits, reverse=True)  # level 0 is the least compressed
        # Sequential calibration bit-width (None: dense inputs); `auto` is the smallest level at or above the target.
        if config.calibration_bits == "auto":
            self.calibration_bits: int | None = min(b for b in self.bits if b >= config.target)
        else:
            self.calibration_bits = None if config.calibration_bits == "dense" else int(config.calibration_bits)

    # ------------------------------------------------------------------ configuration
    @classmethod
    def validate_config(cls, config: Any) -> None:
        super().validate_config(config)
        bits = config.bits
        if not isinstance(bits, (list, tuple)) or len(bits) < 2 or any(
                isinstance(b, bool) or not isinstance(b, int) for b in bits):
            raise TypeError(f"EvoPressConfig.bits must be a list of at least two ints, got {bits!r}")
        if any(b not in SUPPORTED_BITS for b in bits) or len(set(bits)) != len(bits):
            raise ValueError(f"EvoPressConfig.bits: distinct bit-widths in 2..8 (what compressed-tensors can store), "
                             f"got {list(bits)}")
        if not min(bits) <= config.target <= max(bits):
            raise ValueError(f"EvoPressConfig.target: for method 'quantization' the average bit-width must lie "
                             f"within the levels [{min(bits)}, {max(bits)}], got {config.target}")
        if config.group_size is not None and (isinstance(config.group_size, bool) or not isinstance(
                config.group_size, int) or config.group_size < 1):
            raise ValueError(f"EvoPressConfig.group_size: a positive int, or None for one scale per output row, "
                             f"got {config.group_size!r}")
        if config.calibration_bits not in ("auto", "dense") and config.calibration_bits not in bits:
            raise ValueError(f"EvoPressConfig.calibration_bits: 'auto', 'dense' or one of the levels {sorted(bits)}, "
                             f"got {config.calibration_bits!r}")
        if config.search == "uniform" and float(config.target) not in [float(b) for b in bits]:
            raise ValueError(f"EvoPressConfig.target: search='uniform' needs a target that is one of the levels "
                             f"{sorted(bits)}, got {config.target}")

    @classmethod
    def default_settings(cls, preset: str, space: LevelSpace | None = None) -> dict[str, Any]:
        if preset == "paper":
            # The paper's quantization search: 150 generations, 128 offspring, 16@2048 -> 4@16384 -> 1@131072.
            return {"generations": 150, "offspring": 128, "survivors_per_selection": [16, 4, 1],
                    "tokens_per_selection": [2048, 16384, 131072], "initial_candidates": 16,
                    "calibration_tokens": 131072, "sequence_length": 8192}
        return {"generations": 50, "offspring": 16, "survivors_per_selection": [4, 1],
                "tokens_per_selection": [512, 2048], "initial_candidates": 16,
                "calibration_tokens": 8192, "sequence_length": 256}

    # ------------------------------------------------------------------ search space
    def level_space(self) -> LevelSpace:
        group = self.config.group_size
        if group is not None:
            wrong = [name for name, m in self.linears.items() if m.in_features % group]
            if wrong:
                sizes = sorted({self.linears[n].in_features for n in self.linears})
                divisors = [d for d in (32, 64, 128, 256) if all(s % d == 0 for s in sizes)]
                raise ValueError(
                    f"EvoPressConfig.group_size: {group} does not divide the input size of {len(wrong)} layers "
                    f"(e.g. {wrong[0]} with {self.linears[wrong[0]].in_features}); input sizes here are {sizes}, "
                    f"group sizes that divide all of them: {divisors or 'none of 32/64/128/256'}, or None")
        sizes = self.unit_sizes()
        costs = [[b * size for b in self.bits] for size in sizes]
        levels = [tuple(self.bits)] * len(self.units)
        # One group per unit size; its budget is size x the largest whole number of bits over its units whose
        # average does not exceed the target (the 1e-9 absorbs float error, so integer targets are exact).
        groups, distinct = self.size_groups(sizes)
        group_budgets = [math.floor(self.config.target * groups.count(g) + 1e-9) * size
                         for g, size in enumerate(distinct)]
        budget = sum(group_budgets)
        names = [name for name, _ in self.units]
        if self.config.mutation_rule in (None, "size"):
            space = LevelSpace(names, levels, costs, budget, groups=groups, group_budgets=group_budgets)
        else:
            space = LevelSpace(names, levels, costs, budget)
        space.feasible_assignment()  # raises now if the levels cannot meet the budget exactly
        return space

    def _uniform(self, space: LevelSpace) -> Assignment | None:
        """Every unit at the target bit-width, when the target is a level and that meets the budget."""
        if float(self.config.target) not in [float(b) for b in self.bits]:
            return None
        uniform = tuple([self.bits.index(int(self.config.target))] * space.num_units)
        return uniform if space.is_valid(uniform) else None

    # ------------------------------------------------------------------ variants
    def unit_keys(self) -> list[list[int]]:
        return [list(self.bits)] * len(self.units)

    def layer_keys(self, name: str) -> list[int]:
        return list(self.bits)

    def method_settings(self) -> dict[str, Any]:
        c = self.config
        return {"bits": sorted(c.bits), "group_size": c.group_size, "act_order": c.act_order,
                "damp_percent": c.damp_percent, "calibration_bits": self.calibration_bits,
                **({"keep_zeros": True} if c.keep_zeros else {}),
                "scale_dtype": str(next(iter(self.linears.values())).weight.dtype)}

    def variant_bytes(self) -> int:
        weights = sum(m.weight.numel() * m.weight.element_size() for m in self.linears.values())
        packed = self.num_weights * sum(self.bits) / 8
        return int(weights * len(self.bits) + packed)

    def calibration_key(self, name: str) -> int | None:
        return self.calibration_bits

    def solve(self, name: str, weight: torch.Tensor, hessian: torch.Tensor
              ) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        variants = gptq_quantize(weight, hessian, self.bits, self.config.group_size, self.config.act_order,
                                 self.config.damp_percent, scale_dtype=weight.dtype, keep_zeros=self.config.keep_zeros)
        tensors = {}
        for b, variant in variants.items():
            tensors[f"{b}.packed"] = pack_to_int32(variant.qweight, b)
            tensors[f"{b}.scale"] = variant.scale
        return tensors, {b: v.error for b, v in variants.items()}

    def decode(self, name: str, bits: int) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        module = self.linears[name]
        packed = self.database.tensor(name, f"{bits}.packed")
        scale = self.database.tensor(name, f"{bits}.scale")
        q = unpack_from_int32(packed, bits, torch.Size(module.weight.shape))
        return dequantize(q, scale, module.weight.dtype).to(self.weight_device(name))

    def assignment_from_levels(self, levels: dict[str, Any], space: LevelSpace) -> Assignment:
        """Accepts bits per unit or per linear layer (the reference format); members of a unit must agree."""
        if set(levels) == set(space.units):
            return space.from_named(levels)
        unknown = [name for name in levels if name not in self.linears]
        missing = [name for name in self.linears if name not in levels]
        if unknown or missing:
            raise ValueError(f"EvoPressConfig.levels: does not match the model's {len(self.linears)} linear layers "
                             f"or {space.num_units} units: unknown {unknown[:3]}, missing {missing[:3]}")
        assignment = []
        for (unit, members), allowed in zip(self.units, space.levels):
            found = {levels[m] for m in members}
            if len(found) != 1:
                raise ValueError(f"EvoPressConfig.levels: the layers of unit {unit!r} have different bit-widths "
                                 f"{sorted(found)}; granularity {self.granularity!r} gives them one level")
            bits = found.pop()
            if bits not in allowed:
                raise ValueError(f"EvoPressConfig.levels: {unit!r} at {bits!r} bits is not one of the levels "
                                 f"{list(allowed)}")
            assignment.append(allowed.index(bits))
        return tuple(assignment)

    def initial_assignments(self, space: LevelSpace) -> list[Assignment]:
        """At a target that is one of the levels, the uniform assignment starts among the initial candidates."""
        uniform = self._uniform(space)
        return [] if uniform is None else [uniform]

    def summary(self, assignment: Assignment, space: LevelSpace) -> dict[str, Any]:
        total = self.num_weights
        return {"average_bits": space.cost(assignment) / total, "target_average_bits": space.budget / total,
                "database_bytes": self.database.size_bytes if self.database else None}

    # ------------------------------------------------------------------ export
    def export(self, layer_bits: dict[str, int]) -> None:
        """Registers each layer's scales; `save_pretrained` then writes compressed-tensors."""
        for name, bits in layer_bits.items():
            module = self.linears[name]
            scale = self.database.tensor(name, f"{bits}.scale").to(self.weight_device(name))
            module.register_buffer(SCALE_BUFFER, scale, persistent=False)
        self.model.config.evopress = {
            "method": "quantization",
            "granularity": self.granularity,
            "group_size": self.config.group_size,
            "average_bits": sum(layer_bits[n] * m.weight.numel() for n, m in self.linears.items()) / self.num_weights,
            "layer_bits": layer_bits,
        }
        if self.config.keep_zeros:  # the pruned zeros kept, not the weights that also quantized to 0
            self.model.config.evopress["layer_sparsity"] = {
                name: float((self._dense[name] == 0).float().mean()) for name in layer_bits}
        attach_compressed_tensors_saving(self.model)

    # ------------------------------------------------------------------ baselines
    def run_baseline(self, name: str, space: LevelSpace, calibration: torch.Tensor) -> Assignment:
        """`uniform`: every unit at the target bit-width. `dynamic_programming`: the least total normalised
        output error at the budget, assuming layer errors add up."""
        from ..search.baselines import dynamic_programming_search

        if name == "uniform":
            assignment = self._uniform(space)
            if assignment is None:
                raise ValueError(f"search='uniform': {self.config.target} bits everywhere misses the budget")
            return assignment
        if name == "dynamic_programming":
            return dynamic_programming_search(space, self.unit_errors()).assignment
        return super().run_baseline(name, space, calibration)


register_method("quantization", Quantization)
