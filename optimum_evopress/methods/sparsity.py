"""Unstructured sparsity: every linear layer (or block) at its own SparseGPT sparsity.

Levels are steps of a fixed number of weights around the target, the same in every layer (the
paper's construction): a layer of n weights has levels round(target · n) + k · step zeros for
k = -L..L, those below 0% or at 100% left out. Level k = 0 everywhere is the uniform model at the
target, and a level switch (one layer up a step, another down a step) keeps the total number of
zeros exactly. `build` solves SparseGPT for all of a layer's levels from one Hessian
(`sparsegpt_prune`), calibrating sequentially at the target sparsity, and stores each level as a
packed mask plus the kept values. The result exports as a standard checkpoint whose weights hold
exact zeros; `config.evopress` records each layer's sparsity.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..search.space import Assignment, LevelSpace
from ..sparsegpt import decode_sparse, encode_sparse, sparsegpt_prune
from .base import register_method
from .layerwise import LayerwiseMethod

__all__ = ["Sparsity", "OWL_LAMBDAS", "OWL_THRESHOLDS", "owl_sparsities"]

logger = logging.getLogger(__name__)

DEFAULT_STEP_FRACTION = 0.03  # of the mean layer size
# OWL's settings searched on calibration data: the sparsity spread λ and the outlier threshold M.
OWL_LAMBDAS = (0.02, 0.04, 0.06, 0.08, 0.1, 0.15)
OWL_THRESHOLDS = (3, 5, 7, 10)


def owl_sparsities(block_metrics: Sequence[torch.Tensor], target: float, lam: float, threshold: float) -> np.ndarray:
    """OWL (Yin et al., 2024): per block, the sparsity its outlier ratio earns.

    A block's outlier ratio is the share of its weights whose Wanda score |W| · ‖X‖ exceeds
    `threshold` times the block's mean score. Ratios are scaled to [0, 2λ] and centred, so blocks
    with more outliers get lower sparsity and the mean sparsity stays `target`.
    """
    ratios = np.array([float((m > threshold * m.mean()).float().mean()) for m in block_metrics])
    spread = ratios.max() - ratios.min()
    scaled = (ratios - ratios.min()) / spread * 2 * lam if spread > 0 else np.zeros_like(ratios)
    return target - (scaled - scaled.mean())


class Sparsity(LayerwiseMethod):
    """Unstructured SparseGPT sparsity at an average `target` (fraction of zeros) over the linear layers.

    Units are single linear layers (`granularity="linear"`, as in the paper) or whole blocks
    (`"block"`). The budget is the total number of zeros, kept exactly by the level switches.
    """

    granularities = ("linear", "block")
    baselines = ("uniform", "dynamic_programming", "owl")
    candidate_baselines = ("owl",)  # return several candidates; the best on calibration data is kept

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        sizes = [m.weight.numel() for m in self.linears.values()]
        self.step = int(config.sparsity_step or max(1, round(DEFAULT_STEP_FRACTION * sum(sizes) / len(sizes))))
        self.base = {name: round(config.target * m.weight.numel()) for name, m in self.linears.items()}
        full = [name for name, zeros in self.base.items() if zeros >= self.linears[name].weight.numel()]
        if full:
            raise ValueError(f"EvoPressConfig.target: {config.target} leaves no weight in layer {full[0]} "
                             f"({self.linears[full[0]].weight.numel()} weights); a layer keeps at least one weight")
        span = config.sparsity_levels
        self._unit_keys: list[list[int]] = []
        for unit, members in self.units:
            keys = [k for k in range(-span, span + 1)
                    if all(0 <= self.base[m] + k * self.step < self.linears[m].weight.numel() for m in members)]
            if len(keys) < 2:
                raise ValueError(f"EvoPressConfig.sparsity_step: {self.step} weights per step leave unit {unit!r} "
                                 f"with a single level at target {config.target}; use a smaller step")
            self._unit_keys.append(keys)
        self._keys_of_layer = {m: keys for (_, members), keys in zip(self.units, self._unit_keys) for m in members}

    # ------------------------------------------------------------------ configuration
    @classmethod
    def validate_config(cls, config: Any) -> None:
        super().validate_config(config)
        if not 0 < config.target < 1:
            raise ValueError(f"EvoPressConfig.target: for method 'sparsity' the fraction of zeros must lie in (0, 1), "
                             f"got {config.target}")
        if isinstance(config.sparsity_levels, bool) or not isinstance(config.sparsity_levels, int) or not (
                1 <= config.sparsity_levels <= 64):
            raise ValueError(f"EvoPressConfig.sparsity_levels: an int in [1, 64] (levels on each side of the target), "
                             f"got {config.sparsity_levels!r}")
        step = config.sparsity_step
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
            raise ValueError(f"EvoPressConfig.sparsity_step: a positive int (weights per level step) or None, got "
                             f"{step!r}")

    @classmethod
    def default_settings(cls, preset: str, space: LevelSpace | None = None) -> dict[str, Any]:
        if preset == "paper":
            # The paper's sparsity search: 400 generations, 64 offspring, 8@2048 -> 2@16384 -> 1@65536 tokens.
            return {"generations": 400, "offspring": 64, "survivors_per_selection": [8, 2, 1],
                    "tokens_per_selection": [2048, 16384, 65536], "initial_candidates": 16,
                    "calibration_tokens": 65536, "sequence_length": 8192}
        return {"generations": 50, "offspring": 16, "survivors_per_selection": [4, 1],
                "tokens_per_selection": [512, 2048], "initial_candidates": 16,
                "calibration_tokens": 8192, "sequence_length": 256}

    # ------------------------------------------------------------------ search space
    def _zeros(self, members: Sequence[str], key: int) -> int:
        return sum(self.base[m] + key * self.step for m in members)

    def level_space(self) -> LevelSpace:
        sizes = self.unit_sizes()
        costs = [[self._zeros(members, k) for k in keys] for (_, members), keys in zip(self.units, self._unit_keys)]
        levels = [[round(c / size, 6) for c in cs] for cs, size in zip(costs, sizes)]
        names = [name for name, _ in self.units]
        budget = sum(self._zeros(members, 0) for _, members in self.units)
        if self.config.mutation_rule == "size":
            groups, distinct = self.size_groups(sizes)
            group_budgets = [sum(self._zeros(members, 0) for (_, members), g in zip(self.units, groups) if g == i)
                             for i in range(len(distinct))]
            return LevelSpace(names, levels, costs, budget, groups=groups, group_budgets=group_budgets)
        return LevelSpace(names, levels, costs, budget)

    def _uniform(self) -> Assignment:
        return tuple(keys.index(0) for keys in self._unit_keys)

    # ------------------------------------------------------------------ variants
    def unit_keys(self) -> list[list[int]]:
        return self._unit_keys

    def layer_keys(self, name: str) -> list[int]:
        return self._keys_of_layer[name]

    def method_settings(self) -> dict[str, Any]:
        return {"target": self.config.target, "step": self.step, "levels": self.config.sparsity_levels,
                "damp_percent": self.config.damp_percent, "granularity": self.granularity,
                "dtype": str(next(iter(self.linears.values())).weight.dtype)}

    def calibration_key(self, name: str) -> int:
        return 0  # sequential calibration at the target sparsity, as SparseGPT prunes

    def solve(self, name: str, weight: torch.Tensor, hessian: torch.Tensor
              ) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
        keys = self.layer_keys(name)
        zeros = [self.base[name] + k * self.step for k in keys]
        variants = sparsegpt_prune(weight, hessian, zeros, self.config.damp_percent, dtype=weight.dtype)
        tensors: dict[str, torch.Tensor] = {"input_norm": hessian.diagonal().clamp_min(0).sqrt().cpu()}
        for k, z in zip(keys, zeros):
            for part, tensor in encode_sparse(variants[z].weight).items():
                tensors[f"{k}.{part}"] = tensor
        return tensors, {k: variants[z].error for k, z in zip(keys, zeros)}

    def decode(self, name: str, key: int) -> torch.Tensor:
        module = self.linears[name]
        weight = decode_sparse(self.database.tensor(name, f"{key}.mask"), self.database.tensor(name, f"{key}.values"),
                               module.weight.shape)
        return weight.to(self.weight_device(name))

    # ------------------------------------------------------------------ results
    def assignment_from_levels(self, levels: dict[str, Any], space: LevelSpace) -> Assignment:
        """Accepts each unit's sparsity (as in `EvoPressResult.levels`), matched to the nearest level within 1e-4."""
        missing = [unit for unit in space.units if unit not in levels]
        unknown = [name for name in levels if name not in space.units]
        if missing or unknown:
            raise ValueError(f"EvoPressConfig.levels: does not match the {space.num_units} units: unknown "
                             f"{unknown[:3]}, missing {missing[:3]}")
        assignment = []
        for unit, allowed in zip(space.units, space.levels):
            value = float(levels[unit])
            nearest = min(range(len(allowed)), key=lambda i: abs(allowed[i] - value))
            if abs(allowed[nearest] - value) > 1e-4:
                raise ValueError(f"EvoPressConfig.levels: {unit!r} at sparsity {value} is not one of the levels "
                                 f"{list(allowed)}")
            assignment.append(nearest)
        return tuple(assignment)

    def initial_assignments(self, space: LevelSpace) -> list[Assignment]:
        return [self._uniform()]  # the uniform model at the target always meets the budget

    def summary(self, assignment: Assignment, space: LevelSpace) -> dict[str, Any]:
        return {"average_sparsity": space.cost(assignment) / self.num_weights,
                "target_sparsity": space.budget / self.num_weights, "step_weights": self.step,
                "database_bytes": self.database.size_bytes if self.database else None}

    def export(self, layer_keys: dict[str, int]) -> None:
        zeros = {name: self.base[name] + k * self.step for name, k in layer_keys.items()}
        self.model.config.evopress = {
            "method": "sparsity",
            "granularity": self.granularity,
            "average_sparsity": sum(zeros.values()) / self.num_weights,
            "layer_sparsity": {name: z / self.linears[name].weight.numel() for name, z in zeros.items()},
        }

    # ------------------------------------------------------------------ baselines
    def run_baseline(self, name: str, space: LevelSpace, calibration: torch.Tensor) -> Assignment | list[Assignment]:
        """`uniform`: every layer at the target. `dynamic_programming`: the least total normalised output
        error at the budget, assuming layer errors add up. `owl`: one candidate per OWL setting (λ, M);
        the compressor keeps the one with the best fitness on calibration data."""
        from ..search.baselines import closest_assignment, dynamic_programming_search

        if name == "uniform":
            return self._uniform()
        if name == "dynamic_programming":
            return dynamic_programming_search(space, self.unit_errors()).assignment
        if name == "owl":
            metrics = []
            for i in range(len(self.layers)):
                names = [n for n in self.linears if self.block_of[n] == i]
                metrics.append(torch.cat([
                    (self._dense[n].float().abs() * self.database.tensor(n, "input_norm").float()).reshape(-1)
                    for n in names]) if names else torch.zeros(1))
            candidates = []
            for lam in OWL_LAMBDAS:
                for threshold in OWL_THRESHOLDS:
                    per_block = owl_sparsities(metrics, self.config.target, lam, threshold)
                    desired = [sum(per_block[self.block_of[m]] * self.linears[m].weight.numel() for m in members)
                               for _, members in self.units]
                    candidates.append(closest_assignment(space, desired))
            return list(dict.fromkeys(candidates))
        return super().run_baseline(name, space, calibration)


register_method("sparsity", Sparsity)
