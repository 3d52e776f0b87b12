"""The protocol every compression method follows, and the registry of methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, ContextManager, Sequence

import torch

from ..distributed import ProcessGroup
from ..search.space import Assignment, LevelSpace

if TYPE_CHECKING:
    from ..configuration import EvoPressConfig

__all__ = ["CompressionMethod", "register_method", "get_method_class", "registered_methods"]

_REGISTRY: dict[str, type["CompressionMethod"]] = {}


def register_method(name: str, method_cls: type["CompressionMethod"]) -> None:
    """Makes `method_cls` available as `EvoPressConfig(method=name)`."""
    if name in _REGISTRY and _REGISTRY[name] is not method_cls:
        raise ValueError(f"a compression method named {name!r} is already registered")
    method_cls.name = name
    _REGISTRY[name] = method_cls


def get_method_class(name: str) -> type["CompressionMethod"]:
    if name not in _REGISTRY:
        raise ValueError(f"EvoPressConfig.method: unknown method {name!r}; available: {registered_methods()}")
    return _REGISTRY[name]


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


class CompressionMethod:
    """One way of compressing a model unit by unit.

    A method answers: which units the model has and which levels each may take at what cost
    (`level_space`), how to prepare its variants from calibration data (`build`), how to put the model
    in a candidate's state quickly and reversibly (`set_levels` / `reset`), and how to make a chosen
    assignment permanent for export (`apply`).
    """

    name: ClassVar[str] = ""
    granularities: ClassVar[tuple[str, ...]] = ()
    # Searches only this method can run (e.g. block-influence rankings for depth pruning).
    baselines: ClassVar[tuple[str, ...]] = ()
    # Baselines that return several candidate assignments; the one with the best fitness is kept.
    candidate_baselines: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: torch.nn.Module, config: "EvoPressConfig") -> None:
        self.model = model
        self.config = config
        # The first granularity a method lists is its default.
        self.granularity = config.granularity or (self.granularities[0] if self.granularities else None)
        # The processes sharing `build` (set by the compressor under torch.distributed).
        self.group = ProcessGroup()

    @classmethod
    def validate_config(cls, config: "EvoPressConfig") -> None:
        """Checks the method-specific fields of `config`; raises a `ValueError` naming the field."""
        if config.granularity is not None and config.granularity not in cls.granularities:
            raise ValueError(
                f"EvoPressConfig.granularity: must be one of {cls.granularities} for method {cls.name!r}, "
                f"got {config.granularity!r}"
            )

    @classmethod
    def default_settings(cls, preset: str, space: LevelSpace | None = None) -> dict[str, Any]:
        """Search and data defaults for `preset`; entries that depend on the space appear once it is given."""
        raise NotImplementedError

    def level_space(self) -> LevelSpace:
        raise NotImplementedError

    def build(self, calibration: torch.Tensor, progress: bool = True) -> None:
        """Prepares the per-unit variants from calibration sequences (nothing to do for some methods)."""

    def set_levels(self, assignment: Sequence[int]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def stacked(self, assignments: Sequence[Assignment]) -> ContextManager[None]:
        """A context in which one forward pass computes several assignments: its batch is `len(assignments)`
        equal parts, and part i is computed at `assignments[i]` (to score candidates together,
        `candidate_batch_size`). The model's state afterwards is unspecified; `set_levels` sets it again."""
        raise NotImplementedError

    @property
    def can_stack(self) -> bool:
        """Whether the method implements `stacked`."""
        return type(self).stacked is not CompressionMethod.stacked

    def unit_blocks(self) -> list[int] | None:
        """The decoder block each unit lives in, so that a candidate is only run from its first changed block
        (None: every candidate runs the whole model)."""
        return None

    def apply(self, assignment: Assignment) -> torch.nn.Module:
        """Makes `assignment` permanent on the model, in the form that is exported, and returns the model."""
        raise NotImplementedError

    def assignment_from_levels(self, levels: dict[str, Any], space: LevelSpace) -> Assignment:
        """The assignment that `levels` (`{unit name: level}`, as in `EvoPressResult.levels`) describes."""
        return space.from_named(levels)

    def initial_assignments(self, space: LevelSpace) -> list[Assignment]:
        """Assignments that join the search's random initial candidates (none by default)."""
        return []

    def summary(self, assignment: Assignment, space: LevelSpace) -> dict[str, Any]:
        """Method-specific facts about a chosen assignment for the result (e.g. average bits)."""
        return {}

    def run_baseline(self, name: str, space: LevelSpace, calibration: torch.Tensor) -> Assignment | list[Assignment]:
        """The assignment a method-specific baseline chooses (a list of candidates for `candidate_baselines`)."""
        raise ValueError(f"method {self.name!r} has no baseline {name!r}")
