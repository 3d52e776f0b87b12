"""Quantization: every linear layer (or fused group, or block) at its own GPTQ bit-width.

`build` collects each linear layer's Hessian block by block from calibration activations and
solves GPTQ for every bit-width of the level set from that one Hessian; the variants go to a
`VariantDatabase` (memory, or a directory that later runs reuse). During the search a layer is put
at a bit-width by pointing its weight at the dequantized variant (no copy). The result exports as
a compressed-tensors `pack-quantized` checkpoint that plain transformers loads.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..database import VariantDatabase, tensor_fingerprint
from ..formats import SCALE_BUFFER, attach_compressed_tensors_saving
from ..gptq import HessianAccumulator, dequantize, gptq_quantize
from ..models import find_decoder
from ..search.space import Assignment, LevelSpace
from .base import CompressionMethod, register_method

__all__ = ["Quantization", "SUPPORTED_BITS"]

logger = logging.getLogger(__name__)

SUPPORTED_BITS = range(2, 9)  # what compressed-tensors pack-quantized can represent
# Linear layers that read the same input and that vLLM fuses: they share one level at granularity "fused".
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _StopForward(Exception):
    pass


class Quantization(CompressionMethod):
    """Mixed-precision GPTQ at an average bit-width `target` over the decoder's linear layers.

    Units are single linear layers (`granularity="linear"`, as in the paper), fused groups whose
    members share a bit-width so vLLM can serve the model (`"fused"`: q/k/v, gate/up), or whole
    blocks (`"block"`). The budget is the total number of weight bits; with `mutation_rule="size"`
    bits are only exchanged between units of equal size, so every size group averages `target`.
    """

    granularities = ("linear", "fused", "block")
    baselines = ("uniform", "dynamic_programming")

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.path, self.layers, self.arch = find_decoder(model)
        self.bits = sorted(config.bits, reverse=True)  # level 0 is the least compressed
        self.linears: dict[str, nn.Linear] = {}
        self.block_of: dict[str, int] = {}
        for i, block in enumerate(self.layers):
            for local, module in block.named_modules():
                if not local:
                    continue
                name = f"{self.path}.{i}.{local}"
                if isinstance(module, nn.Linear):
                    self.linears[name] = module
                    self.block_of[name] = i
                elif any(p.dim() == 2 for p in module.parameters(recurse=False)) and not isinstance(
                        module, nn.Embedding):
                    raise TypeError(
                        f"[evopress:quantization] module {name!r} ({type(module).__name__}) holds a 2-D weight but "
                        "is not an nn.Linear, and no adapter quantizes it")
        self.units = self._units()
        self.quantized_weights = sum(m.weight.numel() for m in self.linears.values())
        # Sequential calibration bit-width (None: dense inputs); `auto` is the smallest level at or above the target.
        if config.calibration_bits == "auto":
            self.calibration_bits: int | None = min(b for b in self.bits if b >= config.target)
        else:
            self.calibration_bits = None if config.calibration_bits == "dense" else int(config.calibration_bits)
        self.database: VariantDatabase | None = None
        self._dense: dict[str, torch.Tensor] = {}  # taken in build(), after the model is moved and cast
        self._variants: dict[str, dict[int, torch.Tensor]] = {}
        self._current: dict[str, int | None] = {name: None for name in self.linears}

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
    def _units(self) -> list[tuple[str, list[str]]]:
        """(unit name, its linear layers) in model order."""
        if self.granularity == "linear":
            return [(name, [name]) for name in self.linears]
        units: list[tuple[str, list[str]]] = []
        if self.granularity == "block":
            for i in range(len(self.layers)):
                members = [name for name in self.linears if self.block_of[name] == i]
                if members:
                    units.append((f"{self.path}.{i}", members))
            return units
        seen: set[str] = set()
        for name in self.linears:
            if name in seen:
                continue
            parent, _, local = name.rpartition(".")
            group = next((g for g in FUSED_GROUPS if local in g), None)
            members = [f"{parent}.{m}" for m in group if f"{parent}.{m}" in self.linears] if group else [name]
            seen.update(members)
            label = members[0] if len(members) == 1 else f"{parent}." + "+".join(m.rpartition(".")[2] for m in members)
            units.append((label, members))
        return units

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
        sizes = [sum(self.linears[m].weight.numel() for m in members) for _, members in self.units]
        costs = [[b * size for b in self.bits] for size in sizes]
        levels = [tuple(self.bits)] * len(self.units)
        # One group per unit size; each group's budget is its share of the target, rounded to whole bits per unit.
        distinct = sorted(set(sizes))
        groups = [distinct.index(size) for size in sizes]
        group_budgets = [round(self.config.target * groups.count(g)) * size for g, size in enumerate(distinct)]
        budget = sum(group_budgets)
        names = [name for name, _ in self.units]
        if self.config.mutation_rule == "size":
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

    # ------------------------------------------------------------------ database
    def database_settings(self, calibration: torch.Tensor) -> dict[str, Any]:
        c = self.config
        return {
            "method": "quantization", "bits": sorted(c.bits), "group_size": c.group_size, "act_order": c.act_order,
            "damp_percent": c.damp_percent, "calibration_bits": self.calibration_bits,
            "scale_dtype": str(next(iter(self.linears.values())).weight.dtype),
            "model": tensor_fingerprint(m.weight for m in self.linears.values()),
            "layers": len(self.linears),
            "calibration": tensor_fingerprint([calibration]),
        }

    def variants_fit_in_memory(self) -> bool:
        """Whether `database_in_memory` (None: decide) keeps the dequantized variants in memory."""
        if self.config.database_in_memory is not None or self.config.database_dir is None:
            return self.config.database_in_memory is not False
        import psutil

        weights = sum(m.weight.numel() * m.weight.element_size() for m in self.linears.values())
        packed = sum(m.weight.numel() for m in self.linears.values()) * sum(self.bits) / 8
        return weights * len(self.bits) + packed < psutil.virtual_memory().available / 2

    def build(self, calibration: torch.Tensor, progress: bool = True) -> None:
        self._dense = {name: module.weight.data for name, module in self.linears.items()}
        settings = self.database_settings(calibration)
        directory = self.config.database_dir
        in_memory = self.variants_fit_in_memory()
        if not in_memory:
            logger.info("the variants do not fit in memory: reading them from %s at each swap", directory)
        if VariantDatabase.exists(directory):
            self.database = VariantDatabase.open(directory, settings, self.linears, in_memory)
            logger.info("reusing the GPTQ database in %s (%.1f MiB)", directory, self.database.size_bytes / 2**20)
        else:
            self.database = VariantDatabase(settings, directory, in_memory)
            self._build_database(calibration, progress)
            self.database.finish()
            logger.info("built the GPTQ database (%d layers x %d bit-widths, %.1f MiB)", len(self.linears),
                        len(self.bits), self.database.size_bytes / 2**20)
        if in_memory:
            self._variants = {name: {b: self._decode(name, b) for b in self.bits} for name in self.linears}

    def _decode(self, name: str, bits: int) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        module = self.linears[name]
        packed = self.database.tensor(name, f"{bits}.packed")
        scale = self.database.tensor(name, f"{bits}.scale")
        q = unpack_from_int32(packed, bits, torch.Size(module.weight.shape))
        return dequantize(q, scale, module.weight.dtype).to(module.weight.device)

    @torch.no_grad()
    def _build_database(self, calibration: torch.Tensor, progress: bool) -> None:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        self.reset()
        widest = max(m.in_features for m in self.linears.values())
        if calibration.numel() < 2 * widest:
            logger.warning("%d calibration tokens for layers with up to %d inputs: GPTQ fits the few inputs it sees "
                           "and generalises poorly; use several times more tokens than inputs", calibration.numel(),
                           widest)
        device = next(self.model.parameters()).device
        inputs = self._first_block_inputs(calibration, device)
        scale_dtype = next(iter(self.linears.values())).weight.dtype
        for i, block in enumerate(tqdm(self.layers, desc="GPTQ database", disable=not progress)):
            names = [name for name in self.linears if self.block_of[name] == i]
            accumulators: dict[str, HessianAccumulator] = {}
            owner: dict[str, str] = {}
            last: list[Any] = [None, None]

            def hook(name: str):
                def record(module: nn.Module, args: tuple) -> None:
                    x = args[0]
                    if last[0] is x:  # q/k/v (gate/up) read the same tensor: one Hessian serves them all
                        owner[name] = owner[last[1]]
                        return
                    owner[name] = name
                    last[0], last[1] = x, name
                    accumulators.setdefault(name, HessianAccumulator(x.shape[-1], device)).add_batch(x)
                return record

            handles = [self.linears[name].register_forward_pre_hook(hook(name)) for name in names]
            try:
                outputs = [self._run_block(block, hidden, extra) for hidden, extra in inputs]
            finally:
                for handle in handles:
                    handle.remove()
            last[0] = None
            hessians = {name: acc.hessian() for name, acc in accumulators.items()}
            unused = [name for name in names if name not in owner]
            if unused:
                raise ValueError(f"[evopress:quantization] layers {unused} saw no input during calibration, so GPTQ "
                                 "cannot quantize them")
            for name in names:
                module = self.linears[name]
                variants = gptq_quantize(module.weight, hessians[owner[name]], self.bits, self.config.group_size,
                                         self.config.act_order, self.config.damp_percent, scale_dtype=scale_dtype)
                tensors = {}
                for b, variant in variants.items():
                    tensors[f"{b}.packed"] = pack_to_int32(variant.qweight, b)
                    tensors[f"{b}.scale"] = variant.scale
                self.database.add_layer(name, tensors, {b: v.error for b, v in variants.items()})
            del hessians
            accumulators.clear()
            if self.calibration_bits is not None:
                # Sequential calibration: the next block sees this block's outputs at the calibration bit-width.
                for name in names:
                    self.linears[name].weight.data = self._decode(name, self.calibration_bits)
                outputs = [self._run_block(block, hidden, extra) for hidden, extra in inputs]
                for name in names:
                    self.linears[name].weight.data = self._dense[name]
            inputs = [(out, extra) for out, (_, extra) in zip(outputs, inputs)]

    def _first_block_inputs(self, calibration: torch.Tensor, device: torch.device) -> list[tuple[torch.Tensor, Any]]:
        """Runs the model up to its first block and keeps that block's inputs (hidden states and keyword arguments)."""
        captured: list[tuple[torch.Tensor, Any]] = []

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append((hidden, (args[1:], dict(kwargs))))
            raise _StopForward

        handle = self.layers[0].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            for start in range(0, len(calibration), self.config.batch_size):
                try:
                    self.model(input_ids=calibration[start:start + self.config.batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return captured

    @staticmethod
    def _run_block(block: nn.Module, hidden: torch.Tensor, extra: Any) -> torch.Tensor:
        args, kwargs = extra
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    # ------------------------------------------------------------------ swapping
    def _layer_bits(self, assignment: Sequence[int]) -> dict[str, int]:
        return {name: self.bits[level] for (_, members), level in zip(self.units, assignment) for name in members}

    def set_levels(self, assignment: Sequence[int]) -> None:
        for name, bits in self._layer_bits(assignment).items():
            if self._current[name] != bits:
                weight = self._variants[name][bits] if self._variants else self._decode(name, bits)
                self.linears[name].weight.data = weight
                self._current[name] = bits

    def reset(self) -> None:
        for name, module in self.linears.items():
            if self._current[name] is not None:
                module.weight.data = self._dense[name]
                self._current[name] = None

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
        total = self.quantized_weights
        return {"average_bits": space.cost(assignment) / total, "target_average_bits": space.budget / total,
                "database_bytes": self.database.size_bytes if self.database else None}

    def unit_errors(self) -> list[list[float]]:
        """Per unit and level: the summed normalised output error of its layers, weighted by layer size."""
        errors = []
        for _, members in self.units:
            total = sum(self.linears[m].weight.numel() for m in members)
            errors.append([sum(self.database.errors[m][str(b)] * self.linears[m].weight.numel() / total
                               for m in members) for b in self.bits])
        return errors

    # ------------------------------------------------------------------ export
    def apply(self, assignment: Assignment) -> nn.Module:
        """Puts every layer at its chosen bit-width for good; `save_pretrained` then writes compressed-tensors."""
        self.set_levels(assignment)
        layer_bits = self._layer_bits(assignment)
        for name, bits in layer_bits.items():
            module = self.linears[name]
            scale = self.database.tensor(name, f"{bits}.scale").to(module.weight.device)
            module.register_buffer(SCALE_BUFFER, scale, persistent=False)
        self.model.config.evopress = {
            "method": "quantization",
            "granularity": self.granularity,
            "group_size": self.config.group_size,
            "average_bits": sum(layer_bits[n] * m.weight.numel() for n, m in self.linears.items())
            / self.quantized_weights,
            "layer_bits": layer_bits,
        }
        attach_compressed_tensors_saving(self.model)
        self._variants = {}
        self._current = {name: None for name in self.linears}
        self._dense = {}
        return self.model

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
