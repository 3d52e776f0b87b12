"""Baselines that work on any `LevelSpace`: random, brute force, and one-unit-at-a-time ranking."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .evolution import Evaluate, SearchResult
from .space import Assignment, LevelSpace

__all__ = ["random_search", "brute_force_search", "one_at_a_time_search", "rank_to_assignment",
           "MAX_BRUTE_FORCE_CANDIDATES"]

MAX_BRUTE_FORCE_CANDIDATES = 20_000


def random_search(space: LevelSpace, seed: int = 0) -> SearchResult:
    """One uniformly drawn assignment at the budget (a sanity baseline)."""
    rng = np.random.default_rng(seed)
    return SearchResult(assignment=space.random_assignment(rng), fitness=None)


def _all_assignments(space: LevelSpace) -> list[Assignment]:
    # Depth-first enumeration with pruning on the remaining reachable cost.
    lows = [min(c) for c in space.costs]
    highs = [max(c) for c in space.costs]
    suffix_low = list(itertools.accumulate(reversed(lows)))[::-1] + [0]
    suffix_high = list(itertools.accumulate(reversed(highs)))[::-1] + [0]
    found: list[Assignment] = []

    def walk(unit: int, prefix: list[int], spent: int) -> None:
        if len(found) > MAX_BRUTE_FORCE_CANDIDATES:
            return
        if unit == space.num_units:
            if spent == space.budget:
                found.append(tuple(prefix))
            return
        for level, cost in enumerate(space.costs[unit]):
            rest = space.budget - spent - cost
            if suffix_low[unit + 1] <= rest <= suffix_high[unit + 1]:
                prefix.append(level)
                walk(unit + 1, prefix, spent + cost)
                prefix.pop()

    walk(0, [], 0)
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
        scores.extend(float(s) for s in evaluate(candidates[start:start + 64], num_tokens, np.random.default_rng(seed)))
    best = int(np.argmin(scores))
    return SearchResult(assignment=candidates[best], fitness=scores[best])


def rank_to_assignment(space: LevelSpace, importance: Sequence[float]) -> Assignment:
    """Compresses the least important units first (to their next level) until the budget is met exactly.

    Meant for two-level spaces such as depth pruning, where a ranking of units is the whole decision.
    """
    assignment = [0] * space.num_units
    spent = space.cost(assignment)
    for unit in sorted(range(space.num_units), key=lambda u: importance[u]):
        step = space.costs[unit][1] - space.costs[unit][0]
        if spent + step <= space.budget:
            assignment[unit] = 1
            spent += step
        if spent == space.budget:
            return tuple(assignment)
    raise ValueError(f"cannot meet the budget {space.budget} exactly by ranking units")


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
    scores = [float(s) for s in evaluate(singles, num_tokens, np.random.default_rng(seed))]
    assignment = rank_to_assignment(space, scores)
    return SearchResult(assignment=assignment, fitness=None, history=[{"unit_scores": scores}])

