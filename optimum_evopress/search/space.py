"""The search space: units, their ordered levels, the cost of each level, and one exact budget.

An assignment is a tuple holding one level index per unit. Each unit's levels are ordered and their
costs are monotonic in the level index, increasing or decreasing. The search never sees a model,
only this space.
"""

from __future__ import annotations

import hashlib
import json
import math
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
        levels: for each unit, its levels in order (e.g. `["kept", "dropped"]`).
        costs: for each unit, an integer cost per level, monotonic in the level index (either direction);
            the budget is a sum of these.
        budget: the exact total cost of a valid assignment.
        groups: optional group index per unit (0..G-1). With groups, each group keeps its own exact
            budget and level switches only pair units of the same group (the paper's rule of
            exchanging bits only between layers of equal size).
        group_budgets: the exact cost of each group; they sum to `budget`.

    `regular` (computed) is True when every unit's adjacent levels are one cost step apart; see
    `level_switch_mutation` for what changes when they are not.
    """

    units: tuple[str, ...]
    levels: tuple[tuple[Any, ...], ...]
    costs: tuple[tuple[int, ...], ...]
    budget: int
    groups: tuple[int, ...] | None = None
    group_budgets: tuple[int, ...] | None = None

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
        if (self.groups is None) != (self.group_budgets is None):
            raise ValueError("LevelSpace: groups and group_budgets go together")
        if self.groups is not None:
            object.__setattr__(self, "groups", tuple(int(g) for g in self.groups))
            object.__setattr__(self, "group_budgets", tuple(int(b) for b in self.group_budgets))
            if len(self.groups) != len(self.units) or set(self.groups) != set(range(len(self.group_budgets))):
                raise ValueError("LevelSpace: groups must give each unit a group index 0..G-1, every group used")
            if sum(self.group_budgets) != self.budget:
                raise ValueError(f"LevelSpace: group budgets sum to {sum(self.group_budgets)}, not {self.budget}")
        # Regular: each unit's adjacent levels are one cost step apart (depth, sparsity, evenly spaced bits), so
        # pairing one-level moves of equal step suffices; uneven steps (bits 6 -> 8 among 1-bit steps) need more.
        object.__setattr__(self, "regular", all(len({b - a for a, b in zip(cs, cs[1:])}) == 1 for cs in self.costs))

    def group_members(self) -> list[list[int]]:
        """Unit indices of each group (one group holding every unit when the space has no groups)."""
        if self.groups is None:
            return [list(range(self.num_units))]
        members: list[list[int]] = [[] for _ in self.group_budgets]
        for u, g in enumerate(self.groups):
            members[g].append(u)
        return members

    @property
    def num_units(self) -> int:
        return len(self.units)

    def cost(self, assignment: Sequence[int]) -> int:
        return sum(self.costs[u][lv] for u, lv in enumerate(assignment))

    def is_valid(self, assignment: Sequence[int]) -> bool:
        if not (len(assignment) == self.num_units
                and all(0 <= lv < len(self.levels[u]) for u, lv in enumerate(assignment))
                and self.cost(assignment) == self.budget):
            return False
        return self.groups is None or all(
            sum(self.costs[u][assignment[u]] for u in members) == budget
            for members, budget in zip(self.group_members(), self.group_budgets))

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
        payload = [self.units, [list(map(str, lv)) for lv in self.levels], self.costs, self.budget]
        if self.groups is not None:
            payload += [self.groups, self.group_budgets]
        payload = json.dumps(payload)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def feasible_assignment(self) -> Assignment:
        """A deterministic assignment at the budget; raises when the budget is not reachable exactly.

        Starts from every unit at its cheapest level and moves units one level towards their dearest,
        round-robin, while the next step does not overshoot the budget (of each group, when the space
        has groups). Where that misses the budget (uneven cost steps), an exact search over the group's
        reachable totals decides. Costs must be monotonic in the level index, in either direction.
        """
        assignment = [int(np.argmin(c)) for c in self.costs]
        direction = [1 if c[-1] > c[0] else -1 for c in self.costs]
        budgets = self.group_budgets if self.groups is not None else (self.budget,)
        for members, budget in zip(self.group_members(), budgets):
            remaining = budget - sum(self.costs[u][assignment[u]] for u in members)
            progress = True
            while remaining > 0 and progress:
                progress = False
                for u in members:
                    lv, nxt = assignment[u], assignment[u] + direction[u]
                    if 0 <= nxt < len(self.costs[u]):
                        step = self.costs[u][nxt] - self.costs[u][lv]
                        if 0 < step <= remaining:
                            assignment[u] = nxt
                            remaining -= step
                            progress = True
                            if remaining == 0:
                                break
            if remaining != 0:
                exact = self._exact_levels(members, budget, [assignment[u] for u in members])
                if exact is None:
                    raise ValueError(f"LevelSpace: the budget {budget} cannot be met exactly with these levels")
                for u, lv in zip(members, exact):
                    assignment[u] = lv
        return tuple(assignment)

    def _exact_levels(self, members: list[int], budget: int, near: list[int]) -> list[int] | None:
        """Levels of `members` that total `budget` exactly, or None: a dynamic programme over the reachable totals.

        Costs are taken above each unit's cheapest level and divided by their common divisor, so the table
        has one row per unit and one column per total up to the budget. Walking back from the budget, each
        unit takes the level nearest to `near` (the greedy's levels) that leaves a reachable rest.
        """
        floors = [min(self.costs[u]) for u in members]
        extra = [[c - f for c in self.costs[u]] for u, f in zip(members, floors)]
        target = budget - sum(floors)
        step = math.gcd(target, *(c for cs in extra for c in cs)) or 1
        if target < 0 or target % step:
            return None
        extra, target = [[c // step for c in cs] for cs in extra], target // step
        if len(members) * (target + 1) > 2**28:
            raise ValueError(f"LevelSpace: the budget {budget} is missed by the greedy start and too large "
                             f"({len(members)} units x {target + 1} totals) to search exactly")
        reach = [np.zeros(target + 1, dtype=bool)]  # reach[i][t]: the first i units can total t
        reach[0][0] = True
        for cs in extra:
            row = np.zeros(target + 1, dtype=bool)
            for c in cs:
                if c <= target:
                    row[c:] |= reach[-1][:target + 1 - c]
            reach.append(row)
        if not reach[-1][target]:
            return None
        levels = [0] * len(members)
        for i in reversed(range(len(members))):
            levels[i] = min((lv for lv, c in enumerate(extra[i]) if c <= target and reach[i][target - c]),
                            key=lambda lv: (abs(lv - near[i]), lv))
            target -= extra[i][levels[i]]
        return levels

    def random_assignment(self, rng: np.random.Generator) -> Assignment:
        """A random assignment at the budget: a long random walk of level switches from a feasible start."""
        assignment = self.feasible_assignment()
        for _ in range(4 * self.num_units + 16):
            assignment = level_switch_mutation(self, assignment, rng, flips=1)
        return assignment


def level_switch_mutation(space: LevelSpace, parent: Sequence[int], rng: np.random.Generator, flips: int) -> Assignment:
    """Applies `flips` budget-preserving level switches to `parent`.

    In a regular space (see `LevelSpace`) one switch raises a unit by one level and lowers another
    unit (of the same group, when the space has groups) by one level whose cost step is the same, so
    the total cost never changes. Otherwise one unit moves one level and another unit of its group
    moves to whichever level offsets that cost change exactly (e.g. 6 -> 8 bits against 4 -> 2).
    Where no such pair exists, the parent is returned.
    """
    child = list(parent)
    for _ in range(flips):
        if not space.regular:
            _uneven_switch(space, child, rng)
            continue
        up = [u for u in range(space.num_units) if child[u] + 1 < len(space.levels[u])]
        rng.shuffle(up)
        for u in up:
            step = space.costs[u][child[u] + 1] - space.costs[u][child[u]]
            down = [
                v
                for v in range(space.num_units)
                if v != u and child[v] > 0 and space.costs[v][child[v]] - space.costs[v][child[v] - 1] == step
                and (space.groups is None or space.groups[v] == space.groups[u])
            ]
            if down:
                v = down[int(rng.integers(len(down)))]
                child[u] += 1
                child[v] -= 1
                break
    return tuple(child)


def _uneven_switch(space: LevelSpace, child: list[int], rng: np.random.Generator) -> None:
    """One switch in place for uneven cost steps: unit u moves one level (a random direction first), and a
    random unit v of its group moves to the level (any, not only the next) whose cost offsets u's change."""
    order = list(range(space.num_units))
    rng.shuffle(order)
    for u in order:
        moves = [lv for lv in (child[u] + 1, child[u] - 1) if 0 <= lv < len(space.costs[u])]
        if len(moves) == 2 and rng.integers(2):
            moves.reverse()
        for lv in moves:
            delta = space.costs[u][lv] - space.costs[u][child[u]]
            if not delta:
                continue
            partners = [
                (v, space.costs[v].index(space.costs[v][child[v]] - delta))
                for v in range(space.num_units)
                if v != u and (space.groups is None or space.groups[v] == space.groups[u])
                and space.costs[v][child[v]] - delta in space.costs[v]
            ]
            if partners:
                v, level = partners[int(rng.integers(len(partners)))]
                child[u], child[v] = lv, level
                return
