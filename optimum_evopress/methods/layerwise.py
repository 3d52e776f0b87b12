"""The shared machinery of methods that give every linear layer its own variant: units, Hessians, database, swaps.

A layer-wise method (quantization, sparsity) sees the decoder's `nn.Linear` layers, grouped into
units (`linear`: one layer; `fused`: q/k/v and gate/up; `block`: a whole block). Each unit's level is
a key shared by its layers (a bit-width, a sparsity step). `build` runs the calibration data block
by block, accumulates every layer's Hessian from its inputs (layers that read the same tensor share
one), and asks the method to `solve` all of a layer's variants from it; the variants go to a
`VariantDatabase` (memory, or a directory later runs reuse). With sequential calibration each block
sees the outputs of the earlier blocks already compressed at the calibration level. During the
search a layer is put at a level by pointing its weight at the decoded variant (no copy). Layers that
accelerate offloads (`device_map` with "cpu" or "disk") keep their variants on the CPU, and their hook
loads the current one for each forward pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from typing import Any, Hashable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..database import VariantDatabase, tensor_fingerprint
from ..distributed import balanced_shares
from ..gptq import HessianAccumulator
from ..models import find_decoder, input_device, is_offloaded, set_weight, stored_weight
from ..search.space import Assignment, LevelSpace
from .base import CompressionMethod

__all__ = ["LayerwiseMethod", "FUSED_GROUPS"]

logger = logging.getLogger(__name__)

# Linear layers that read the same input and that vLLM fuses: they share one level at granularity "fused".
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _StopForward(Exception):
    pass


class LayerwiseMethod(CompressionMethod):
    """Base of methods whose levels are per-linear-layer variants solved from each layer's Hessian.

    Subclasses define `unit_keys` (each unit's level keys, least compressed first), `solve` (a layer's
    variants from its Hessian), `decode` (a variant as a weight), `calibration_key` and `export`.
    """

    granularities = ("linear", "fused", "block")

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        self.path, self.layers, self.arch = find_decoder(model)
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
                        f"[evopress:{self.name}] module {name!r} ({type(module).__name__}) holds a 2-D weight but "
                        f"is not an nn.Linear, and no adapter compresses it")
        stranded = [name for name, module in self.linears.items()
                    if module.weight.device.type == "meta" and not is_offloaded(module)]
        if stranded:
            raise ValueError(f"[evopress:{self.name}] layer {stranded[0]!r} has no weight (meta device) and no "
                             "accelerate offload hook that loads one; load the model with real weights or with a "
                             "device_map")
        self.units = self._units()
        self.num_weights = sum(m.weight.numel() for m in self.linears.values())
        self.database: VariantDatabase | None = None
        self._dense: dict[str, torch.Tensor] = {}  # taken in build(), after the model is moved and cast
        self._variants: dict[str, dict[Hashable, torch.Tensor]] = {}
        self._current: dict[str, Hashable | None] = {name: None for name in self.linears}

    # ------------------------------------------------------------------ to be defined by a method
    def unit_keys(self) -> list[list[Hashable]]:
        """For each unit, the level keys its layers share, least compressed first."""
        raise NotImplementedError

    def layer_keys(self, name: str) -> list[Hashable]:
        """Every key a layer has a variant for (the union over the units it can be in)."""
        raise NotImplementedError

    def solve(self, name: str, weight: torch.Tensor, hessian: torch.Tensor
              ) -> tuple[dict[str, torch.Tensor], dict[Hashable, float]]:
        """All variants of one layer: database tensors (keys `"<level key>.<part>"`) and the error per level key."""
        raise NotImplementedError

    def decode(self, name: str, key: Hashable) -> torch.Tensor:
        """The weight of layer `name` at level `key`, from the database, in the layer's dtype on `weight_device`."""
        raise NotImplementedError

    def weight_device(self, name: str) -> torch.device:
        """Where layer `name` keeps its weights: its device, or the CPU when accelerate offloads it."""
        module = self.linears[name]
        return torch.device("cpu") if is_offloaded(module) else module.weight.device

    def calibration_key(self, name: str) -> Hashable | None:
        """The level each layer takes for sequential calibration (None: the next block sees dense outputs)."""
        return None

    def method_settings(self) -> dict[str, Any]:
        """Settings the variants depend on; a database built with others is refused."""
        raise NotImplementedError

    def variant_bytes(self) -> int:
        """Bytes all decoded variants take in memory."""
        return sum(m.weight.numel() * m.weight.element_size() * len(self.layer_keys(n))
                   for n, m in self.linears.items())

    # ------------------------------------------------------------------ units
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

    def unit_blocks(self) -> list[int]:
        return [self.block_of[members[0]] for _, members in self.units]

    def unit_sizes(self) -> list[int]:
        return [sum(self.linears[m].weight.numel() for m in members) for _, members in self.units]

    @staticmethod
    def size_groups(sizes: Sequence[int]) -> tuple[list[int], list[int]]:
        """Each unit's group index under the paper's size rule (one group per distinct size), and those sizes."""
        distinct = sorted(set(sizes))
        return [distinct.index(size) for size in sizes], distinct

    def _layer_keys_of(self, assignment: Sequence[int]) -> dict[str, Hashable]:
        keys = self.unit_keys()
        return {name: keys[u][level] for u, ((_, members), level) in enumerate(zip(self.units, assignment))
                for name in members}

    # ------------------------------------------------------------------ database
    def database_settings(self, calibration: torch.Tensor) -> dict[str, Any]:
        """What the variants depend on (called in `build`, once the dense weights are taken)."""
        return {
            "method": self.name, **self.method_settings(),
            "model": tensor_fingerprint(self._dense[name] for name in self.linears),
            "layers": len(self.linears),
            "calibration": tensor_fingerprint([calibration]),
        }

    def variants_fit_in_memory(self) -> bool:
        """Whether `database_in_memory` (None: decide) keeps the decoded variants in memory."""
        if self.config.database_in_memory is not None or self.config.database_dir is None:
            return self.config.database_in_memory is not False
        import psutil

        return self.variant_bytes() < psutil.virtual_memory().available / 2

    def build(self, calibration: torch.Tensor, progress: bool = True) -> None:
        self._dense = {name: stored_weight(module) for name, module in self.linears.items()}
        settings = self.database_settings(calibration)
        directory = self.config.database_dir
        in_memory = self.variants_fit_in_memory()
        if not in_memory:
            logger.info("the variants do not fit in memory: decoding them from the database at each swap")
        exists = VariantDatabase.exists(directory)
        if self.group.active:  # the main process's view, so every process reaches the same collectives
            exists = self.group.all_gather(exists)[0]
        if exists:
            self.database = VariantDatabase.open(directory, settings, self.linears, in_memory)
            logger.info("reusing the %s database in %s (%.1f MiB)", self.name, directory,
                        self.database.size_bytes / 2**20)
        else:
            # A build interrupted in this directory is continued from its first missing layer.
            self.database = VariantDatabase.start(settings, directory, in_memory, writable=self.group.is_main)
            self._build_database(calibration, progress)
            self.database.finish()
            if self.group.active and directory is not None:
                self.group.barrier()  # the main process has written every layer file and the manifest
                if not self.group.is_main:
                    self.database = VariantDatabase.open(directory, settings, self.linears, in_memory)
            logger.info("built the %s database (%d layers, %.1f MiB)", self.name, len(self.linears),
                        self.database.size_bytes / 2**20)
        if in_memory:
            self._variants = {name: {key: self.decode(name, key) for key in self.layer_keys(name)}
                              for name in self.linears}

    @torch.no_grad()
    def _build_database(self, calibration: torch.Tensor, progress: bool) -> None:
        self.reset()
        widest = max(m.in_features for m in self.linears.values())
        if calibration.numel() < 2 * widest:
            logger.warning("%d calibration tokens for layers with up to %d inputs: the Hessians are rank-deficient "
                           "and the variants generalise poorly; use several times more tokens than inputs",
                           calibration.numel(), widest)
        inputs = self._first_block_inputs(calibration, input_device(self.model))
        for i, block in enumerate(tqdm(self.layers, desc=f"{self.name} database", disable=not progress)):
            names = [name for name in self.linears if self.block_of[name] == i]
            if all(self.database.has_layer(name) for name in names):
                # Done by an interrupted build: only this block's outputs are needed, for the next block.
                if i + 1 < len(self.layers):
                    inputs = self._next_inputs(block, names, inputs)
                continue
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
                    accumulators.setdefault(name, HessianAccumulator(x.shape[-1], x.device)).add_batch(x)
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
                raise ValueError(f"[evopress:{self.name}] layers {unused} saw no input during calibration, so "
                                 "their variants cannot be solved")
            # Under torch.distributed each process solves a share of the layers, balanced by the O(rows * cols^2)
            # cost of a solve, and every process receives all of them.
            todo = [name for name in names if not self.database.has_layer(name)]
            share = balanced_shares([self.linears[n].out_features * self.linears[n].in_features ** 2 for n in todo],
                                    self.group.world_size)[self.group.rank]
            solved = {}
            for index in share:
                name = todo[index]
                hessian = hessians[owner[name]]  # on the block's execution device
                tensors, errors = self.solve(name, self._dense[name].to(hessian.device), hessian)
                solved[name] = ({key: value.cpu() for key, value in tensors.items()}, errors)
            for part in self.group.all_gather(solved):
                solved.update(part)
            for name in todo:
                self.database.add_layer(name, *solved.pop(name))
            del hessians
            accumulators.clear()
            if any(self.calibration_key(name) is not None for name in names):
                outputs = None  # recomputed at the calibration levels
            inputs = self._next_inputs(block, names, inputs, outputs)

    def _next_inputs(self, block: nn.Module, names: list[str], inputs: list[tuple[torch.Tensor, Any]],
                     outputs: list[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, Any]]:
        """The next block's inputs: this block's outputs, with its layers at their calibration levels if any."""
        if outputs is None:
            # Sequential calibration: the next block sees this block's outputs at the calibration level.
            keys = {name: self.calibration_key(name) for name in names}
            for name, key in keys.items():
                if key is not None:
                    set_weight(self.linears[name], self.decode(name, key))
            try:
                outputs = [self._run_block(block, hidden, extra) for hidden, extra in inputs]
            finally:
                for name in names:
                    set_weight(self.linears[name], self._dense[name])
        return [(out, extra) for out, (_, extra) in zip(outputs, inputs)]

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
    def set_levels(self, assignment: Sequence[int]) -> None:
        self._set_keys(self._layer_keys_of(assignment))

    def _set_keys(self, keys: dict[str, Hashable]) -> None:
        for name, key in keys.items():
            if self._current[name] != key:
                set_weight(self.linears[name], self._weight(name, key))
                self._current[name] = key

    def _weight(self, name: str, key: Hashable) -> torch.Tensor:
        return self._variants[name][key] if self._variants else self.decode(name, key)

    @contextlib.contextmanager
    def stacked(self, assignments: Sequence[Assignment]) -> Iterator[None]:
        """Each layer holds the level most of the parts give it; a forward hook recomputes the rows of the other
        parts with their own variant (one extra product over those rows per differing layer and part)."""
        parts = [self._layer_keys_of(assignment) for assignment in assignments]
        shared = {name: Counter(keys[name] for keys in parts).most_common(1)[0][0] for name in self.linears}
        self._set_keys(shared)
        handles = []
        for name, module in self.linears.items():
            others = [(part, self._weight(name, keys[name])) for part, keys in enumerate(parts)
                      if keys[name] != shared[name]]
            if others:
                handles.append(module.register_forward_hook(_part_override(others, len(parts),
                                                                           stored_weight(module, "bias"))))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def reset(self) -> None:
        for name, module in self.linears.items():
            if self._current[name] is not None:
                set_weight(module, self._dense[name])
                self._current[name] = None

    def unit_errors(self) -> list[list[float]]:
        """Per unit and level: the normalised output error of its layers, averaged weighted by layer size."""
        errors = []
        for (_, members), keys in zip(self.units, self.unit_keys()):
            total = sum(self.linears[m].weight.numel() for m in members)
            errors.append([sum(self.database.errors[m][str(key)] * self.linears[m].weight.numel() / total
                               for m in members) for key in keys])
        return errors

    def apply(self, assignment: Assignment) -> nn.Module:
        """Puts every layer at its chosen level for good, then lets the method record and attach its export."""
        self.set_levels(assignment)
        layer_keys = self._layer_keys_of(assignment)
        self.export(layer_keys)
        self._variants = {}
        self._current = {name: None for name in self.linears}
        self._dense = {}
        return self.model

    def export(self, layer_keys: dict[str, Hashable]) -> None:
        """Records the chosen levels on `model.config.evopress` and prepares the model's checkpoint format."""
        raise NotImplementedError


def _part_override(others: list[tuple[int, torch.Tensor]], num_parts: int, bias: torch.Tensor | None):
    """A linear layer's forward hook that recomputes part i of its batch with weight w for each (i, w) in `others`."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        inputs = args[0]
        rows = inputs.shape[0] // num_parts
        on_device = None if bias is None else bias.to(inputs.device)
        for part, weight in others:
            part_rows = slice(part * rows, (part + 1) * rows)
            output[part_rows] = F.linear(inputs[part_rows], weight.to(inputs.device), on_device)
        return output

    return hook
