"""Baselines that work on any `LevelSpace`: random, brute force, one-unit-at-a-time ranking, and
dynamic programming on per-unit errors."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .evolution import Evaluate, SearchResult
from .space import Assignment, LevelSpace

__all__ = ["random_search", "brute_force_search", "one_at_a_time_search", "rank_to_assignment",
           "dynamic_programming_search", "closest_assignment", "MAX_BRUTE_FORCE_CANDIDATES"]

MAX_BRUTE_FORCE_CANDIDATES = 20_000


def random_search(space: LevelSpace, seed: int = 0, evaluate: Evaluate | None = None, num_tokens: int = 0,
                  candidates: int = 1) -> SearchResult:
    """The best of `candidates` random assignments at the budget, all scored on the same `num_tokens` tokens.

    With one candidate (or no `evaluate`) nothing is scored: a single random draw.
    """
    rng = np.random.default_rng(seed)
    drawn = [space.random_assignment(rng) for _ in range(max(1, candidates))]
    if evaluate is None or len(drawn) == 1:
        return SearchResult(assignment=drawn[0], fitness=None)
    scores = [float(s) for s in evaluate(drawn, num_tokens, np.random.default_rng(seed), None)]
    best = int(np.argmin(scores))
    return SearchResult(assignment=drawn[best], fitness=scores[best], history=[{"candidate_scores": scores}])


def _all_assignments(space: LevelSpace) -> list[Assignment]:
    """Every valid assignment (each group at its own budget), by depth-first enumeration pruned on the cost its
    group's later units can still reach."""
    groups = space.groups if space.groups is not None else [0] * space.num_units
    budgets = list(space.group_budgets) if space.groups is not None else [space.budget]
    # For each unit, the least and most its group's later units can add.
    suffix_low, suffix_high = [0] * space.num_units, [0] * space.num_units
    low, high = [0] * len(budgets), [0] * len(budgets)
    for unit in reversed(range(space.num_units)):
        g = groups[unit]
        suffix_low[unit], suffix_high[unit] = low[g], high[g]
        low[g] += min(space.costs[unit])
        high[g] += max(space.costs[unit])
    found: list[Assignment] = []

    def walk(unit: int, prefix: list[int], spent: list[int]) -> None:
        if len(found) > MAX_BRUTE_FORCE_CANDIDATES:
            return
        if unit == space.num_units:  # every group's last unit left exactly its budget
            found.append(tuple(prefix))
            return
        g = groups[unit]
        for level, cost in enumerate(space.costs[unit]):
            if suffix_low[unit] <= budgets[g] - spent[g] - cost <= suffix_high[unit]:
                prefix.append(level)
                spent[g] += cost
                walk(unit + 1, prefix, spent)
                spent[g] -= cost
                prefix.pop()

    walk(0, [], [0] * len(budgets))
    return found


def brute_force_search(space: LevelSpace, evaluate: Evaluate, num_tokens: int, seed: int = 0,
                       progress: bool = True) -> SearchResult:
    """Scores every assignment at the budget on the same `num_tokens` tokens and returns the best.

    Only for small spaces: raises a `ValueError` past `MAX_BRUTE_FORCE_CANDIDATES` assignments.
    """
    candidates = _all_assignments(space)
    if len(candidates) > MAX_BRUTE_FORCE_CANDIDATES:
        raise ValueError(
            f"search='brute_force': the space has more than {MAX_BRUTE_FORCE_CANDIDATES} assignments at the "
            "budget; use search='evolution'"
        )
    scores: list[float] = []
    for start in tqdm(range(0, len(candidates), 64), desc="brute force", disable=not progress):
        # A generator seeded alike for every chunk draws the same tokens for all candidates.
        scores.extend(float(s) for s in evaluate(candidates[start:start + 64], num_tokens, np.random.default_rng(seed), None))
    best = int(np.argmin(scores))
    return SearchResult(assignment=candidates[best], fitness=scores[best])


def rank_to_assignment(space: LevelSpace, importance: Sequence[float]) -> Assignment:
    """Compresses the least important units first (from level 0 to level 1) until the budget, of each group when
    the space has groups, is met exactly; a unit whose step would overshoot it is skipped.

    Meant for two-level spaces such as depth pruning, where a ranking of units is the whole decision. Costs
    may rise with the level (units removed) or fall (fewer bits).
    """
    assignment = [0] * space.num_units
    budgets = space.group_budgets if space.groups is not None else (space.budget,)
    for members, budget in zip(space.group_members(), budgets):
        remaining = budget - sum(space.costs[u][0] for u in members)
        for unit in sorted(members, key=lambda u: importance[u]):
            if remaining == 0:
                break
            step = space.costs[unit][1] - space.costs[unit][0]
            if 0 < step <= remaining or remaining <= step < 0:  # towards the budget, not past it
                assignment[unit] = 1
                remaining -= step
        if remaining != 0:
            raise ValueError(f"cannot meet the budget {budget} exactly by ranking units")
    return tuple(assignment)


def one_at_a_time_search(space: LevelSpace, evaluate: Evaluate, num_tokens: int, seed: int = 0) -> SearchResult:
    """Shortened-LLaMA-style ranking: compress each unit alone, score it, compress the least harmful ones.

    Every single-unit candidate is scored on the same `num_tokens` tokens.
    """
    if any(len(levels) != 2 for levels in space.levels):
        raise ValueError("search='one_at_a_time' needs two levels per unit")
    singles = []
    for unit in range(space.num_units):
        candidate = [0] * space.num_units
        candidate[unit] = 1
        singles.append(tuple(candidate))
    scores = [float(s) for s in evaluate(singles, num_tokens, np.random.default_rng(seed), None)]
    assignment = rank_to_assignment(space, scores)
    return SearchResult(assignment=assignment, fitness=None, history=[{"unit_scores": scores}])



def dynamic_programming_search(space: LevelSpace, errors: Sequence[Sequence[float]]) -> SearchResult:
    """The assignment at the budget with the least total error, assuming per-unit errors add up.

    `errors[u][level]` is unit u's error at that level (e.g. its normalised output error). Solved
    exactly by a knapsack over costs divided by their greatest common divisor, per group when the
    space has groups.
    """
    if len(errors) != space.num_units or any(len(e) != len(lv) for e, lv in zip(errors, space.levels)):
        raise ValueError("dynamic_programming_search: errors need one value per unit and level")
    assignment = [0] * space.num_units
    budgets = space.group_budgets if space.groups is not None else (space.budget,)
    for members, budget in zip(space.group_members(), budgets):
        base = [min(space.costs[u]) for u in members]
        extra = [[c - b for c in space.costs[u]] for u, b in zip(members, base)]
        target = budget - sum(base)
        unit = math.gcd(target, *[c for cs in extra for c in cs]) or 1
        size = target // unit
        best = np.full(size + 1, np.inf)
        best[0] = 0.0
        choices = np.zeros((len(members), size + 1), dtype=np.int16)
        for i, u in enumerate(members):
            new = np.full(size + 1, np.inf)
            for level, cost in enumerate(extra[i]):
                step = cost // unit
                if step > size:
                    continue
                shifted = np.full(size + 1, np.inf)
                shifted[step:] = best[:size + 1 - step] + float(errors[u][level])
                better = shifted < new
                new[better] = shifted[better]
                choices[i][better] = level
            best = new
        if not np.isfinite(best[size]):
            raise ValueError(f"dynamic_programming_search: the budget {budget} cannot be met exactly")
        remaining = size
        for i in range(len(members) - 1, -1, -1):
            level = int(choices[i][remaining])
            assignment[members[i]] = level
            remaining -= extra[i][level] // unit
    return SearchResult(assignment=tuple(assignment), fitness=None)


def closest_assignment(space: LevelSpace, desired: Sequence[float]) -> Assignment:
    """The assignment at the budget whose unit costs come closest to `desired` (one cost per unit).

    Each unit starts at the level whose cost is nearest its desired cost; then, per group, the
    move (one unit one level) that brings the total towards the budget at the least added distance
    is taken until the budget is met exactly. Used to turn continuous allocations (e.g. OWL's
    per-block sparsities) into levels.
    """
    if len(desired) != space.num_units:
        raise ValueError("closest_assignment: one desired cost per unit")
    assignment = [int(np.argmin([abs(c - d) for c in costs])) for costs, d in zip(space.costs, desired)]
    budgets = space.group_budgets if space.groups is not None else (space.budget,)
    for members, budget in zip(space.group_members(), budgets):
        while True:
            gap = budget - sum(space.costs[u][assignment[u]] for u in members)
            if gap == 0:
                break
            best, best_key = None, None
            for u in members:
                for nxt in (assignment[u] - 1, assignment[u] + 1):
                    if not 0 <= nxt < len(space.costs[u]):
                        continue
                    step = space.costs[u][nxt] - space.costs[u][assignment[u]]
                    if step == 0 or (step > 0) != (gap > 0) or abs(step) > abs(gap):
                        continue
                    added = abs(space.costs[u][nxt] - desired[u]) - abs(space.costs[u][assignment[u]] - desired[u])
                    key = (added / abs(step), u)
                    if best_key is None or key < best_key:
                        best, best_key = (u, nxt), key
            if best is None:
                raise ValueError(f"closest_assignment: the budget {budget} cannot be met exactly from here")
            assignment[best[0]] = best[1]
    return tuple(assignment)
