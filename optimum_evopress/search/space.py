"""The search space: units, their ordered levels, the cost of each level, and one exact budget.

An assignment is a tuple holding one level index per unit. Index 0 is the least compressed level;
higher indices compress more. The search never sees a model, only this space.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["LevelSpace", "Assignment", "level_switch_mutation"]

Assignment = tuple[int, ...]


@dataclass(frozen=True)
class LevelSpace:
    """Units with ordered levels and integer costs, and the total cost every assignment must have.

    Args:
        units: unit names, e.g. `"model.layers.3.self_attn"`.
        levels: for each unit, its levels from least to most compressed (e.g. `["kept", "dropped"]`).
        costs: for each unit, an integer cost per level; the budget is a sum of these.
        budget: the exact total cost of a valid assignment.
    """

    units: tuple[str, ...]
    levels: tuple[tuple[Any, ...], ...]
    costs: tuple[tuple[int, ...], ...]
    budget: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "units", tuple(self.units))
        object.__setattr__(self, "levels", tuple(tuple(lv) for lv in self.levels))
        object.__setattr__(self, "costs", tuple(tuple(int(c) for c in cs) for cs in self.costs))
        if not self.units:
            raise ValueError("LevelSpace: no units")
        if not (len(self.units) == len(self.levels) == len(self.costs)):
            raise ValueError("LevelSpace: units, levels and costs must have one entry per unit")
        for unit, levels, costs in zip(self.units, self.levels, self.costs):
            if len(levels) < 2 or len(levels) != len(costs):
                raise ValueError(f"LevelSpace: unit {unit!r} needs >= 2 levels with one cost each")
        low = sum(min(c) for c in self.costs)
        high = sum(max(c) for c in self.costs)
        if not low <= self.budget <= high:
            raise ValueError(f"LevelSpace: budget {self.budget} is outside the reachable range [{low}, {high}]")

    @property
    def num_units(self) -> int:
        return len(self.units)

    def cost(self, assignment: Sequence[int]) -> int:
        return sum(self.costs[u][lv] for u, lv in enumerate(assignment))

    def is_valid(self, assignment: Sequence[int]) -> bool:
        return (
            len(assignment) == self.num_units
            and all(0 <= lv < len(self.levels[u]) for u, lv in enumerate(assignment))
            and self.cost(assignment) == self.budget
        )

    def named(self, assignment: Sequence[int]) -> dict[str, Any]:
        """The assignment as `{unit name: level}`."""
        return {unit: self.levels[u][lv] for u, (unit, lv) in enumerate(zip(self.units, assignment))}

    def from_named(self, named: dict[str, Any]) -> Assignment:
        """Inverse of `named`; raises a `ValueError` naming the unit or level that does not fit."""
        missing = [unit for unit in self.units if unit not in named]
        extra = [unit for unit in named if unit not in self.units]
        if missing or extra:
            raise ValueError(f"level assignment does not match the units: missing {missing[:5]}, unknown {extra[:5]}")
        assignment = []
        for u, unit in enumerate(self.units):
            if named[unit] not in self.levels[u]:
                raise ValueError(f"unit {unit!r}: level {named[unit]!r} is not one of {list(self.levels[u])}")
            assignment.append(self.levels[u].index(named[unit]))
        return tuple(assignment)

    def fingerprint(self) -> str:
        """A hash of the space, so a saved search state is only resumed on the same space."""
        payload = json.dumps([self.units, [list(map(str, lv)) for lv in self.levels], self.costs, self.budget])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def feasible_assignment(self) -> Assignment:
        """A deterministic assignment at the budget, found greedily; raises when the budget is not reachable exactly.

        Starts from every unit at its cheapest level and raises units one level at a time, round-robin,
        while the next step does not overshoot the budget.
        """
        assignment = [int(np.argmin(c)) for c in self.costs]
        remaining = self.budget - self.cost(assignment)
        progress = True
        while remaining > 0 and progress:
            progress = False
            for u in range(self.num_units):
                lv = assignment[u]
                if lv + 1 < len(self.costs[u]):
                    step = self.costs[u][lv + 1] - self.costs[u][lv]
                    if 0 < step <= remaining:
                        assignment[u] += 1
                        remaining -= step
                        progress = True
                        if remaining == 0:
                            break
        if remaining != 0:
            raise ValueError(f"LevelSpace: the budget {self.budget} cannot be met exactly with these levels")
        return tuple(assignment)

    def random_assignment(self, rng: np.random.Generator) -> Assignment:
        """A random assignment at the budget: a long random walk of level switches from a feasible start."""
        assignment = self.feasible_assignment()
        for _ in range(4 * self.num_units + 16):
            assignment = level_switch_mutation(self, assignment, rng, flips=1)
        return assignment


def level_switch_mutation(space: LevelSpace, parent: Sequence[int], rng: np.random.Generator, flips: int) -> Assignment:
    """Applies `flips` budget-preserving level switches to `parent`.

    One switch raises a unit by one level and lowers another unit by one level whose cost step is
    the same, so the total cost never changes. Where no such pair exists, the parent is returned.
    """
    child = list(parent)
    for _ in range(flips):
        up = [u for u in range(space.num_units) if child[u] + 1 < len(space.levels[u])]
        rng.shuffle(up)
        for u in up:
            step = space.costs[u][child[u] + 1] - space.costs[u][child[u]]
            down = [
                v
                for v in range(space.num_units)
                if v != u and child[v] > 0 and space.costs[v][child[v]] - space.costs[v][child[v] - 1] == step
            ]
            if down:
                v = down[int(rng.integers(len(down)))]
                child[u] += 1
                child[v] -= 1
                break
    return tuple(child)
