"""The (1+lambda) evolutionary search with multi-step selection, elitism and resumable state.

The engine knows nothing about models. It calls `evaluate(candidates, num_tokens, rng, reference)`, which
must score every candidate on one fresh minibatch of exactly `num_tokens` calibration tokens drawn with
`rng`, and return one fitness per candidate (lower is better). `reference` is the current parent (None
while the first is chosen); the candidates are small changes of it, which an evaluator may exploit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..records import differences, write_atomically
from .space import Assignment, LevelSpace, level_switch_mutation

__all__ = ["SearchSettings", "SearchResult", "Evaluate", "evolutionary_search", "multi_step_selection",
           "check_search_state"]

logger = logging.getLogger(__name__)

# evaluate(candidates, num_tokens, rng, reference): `reference` is the current parent (None before the first),
# which every candidate is a small change of; an evaluator may use it to share work (see prefix reuse).
Evaluate = Callable[[Sequence[Assignment], int, np.random.Generator, "Assignment | None"], Sequence[float]]
STATE_VERSION = 1
# The fields of a search state and the JSON types each must have.
_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "version": (int,), "space": (str,), "settings": (dict,), "context": (dict,), "generation": (int,),
    "parent": (list,), "parent_fitness": (int, float, type(None)), "mutation_rng": (dict,), "data_rng": (dict,),
    "history": (list,),
}
_nan_warned = False  # a NaN fitness was reported (the warning is logged once per process)


@dataclass(frozen=True)
class SearchSettings:
    """Settings of the evolutionary search (see `EvoPressConfig` for their meaning)."""

    generations: int
    offspring: int
    survivors_per_selection: tuple[int, ...]
    tokens_per_selection: tuple[int, ...]
    initial_candidates: int = 1
    max_flips: int = 3
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "generations": self.generations,
            "offspring": self.offspring,
            "survivors_per_selection": list(self.survivors_per_selection),
            "tokens_per_selection": list(self.tokens_per_selection),
            "initial_candidates": self.initial_candidates,
            "max_flips": self.max_flips,
            "seed": self.seed,
        }


@dataclass
class SearchResult:
    """What a search found: the assignment, its last fitness, and one history row per generation."""

    assignment: Assignment
    fitness: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


def multi_step_selection(
    candidates: Sequence[Assignment],
    evaluate: Evaluate,
    survivors: Sequence[int],
    tokens: Sequence[int],
    rng: np.random.Generator,
    elite: Assignment | None = None,
) -> tuple[Assignment, float, int]:
    """Scores candidates on growing token budgets, keeping the best `survivors[i]` after stage `i`.

    The `elite` (the current parent) joins the last stage only, so it is always compared on fresh
    tokens against the best offspring. Returns the winner, its last score and the tokens used.
    A NaN score (e.g. a float16 overflow) ranks last.
    """
    global _nan_warned
    pool = list(candidates)
    score, used = float("nan"), 0
    for stage, (keep, num_tokens) in enumerate(zip(survivors, tokens)):
        if stage == len(survivors) - 1 and elite is not None:
            pool.append(elite)
        scores = [float(s) for s in evaluate(pool, num_tokens, rng, elite)]
        used += num_tokens * len(pool)
        if not _nan_warned and any(math.isnan(s) for s in scores):
            logger.warning("a candidate's fitness is NaN (e.g. an overflow in float16); NaN ranks last")
            _nan_warned = True
        # Stable: ties keep the earlier candidate; NaN (which compares False with everything) goes last.
        order = sorted(range(len(pool)), key=lambda i: (math.isnan(scores[i]), scores[i]))
        pool = [pool[i] for i in order[:keep]]
        score = scores[order[0]]
    return pool[0], score, used


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    return rng.bit_generator.state


def _new_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    mutation_seed, data_seed = np.random.SeedSequence(seed).spawn(2)
    return np.random.Generator(np.random.PCG64(mutation_seed)), np.random.Generator(np.random.PCG64(data_seed))


def _write_state(path: str, state: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(state, handle)

    write_atomically(path, write, ".json")


def check_search_state(path: str, space: LevelSpace, settings: SearchSettings, context: dict[str, Any]) -> None:
    """Raises the `ValueError` resuming from `path` would, before any work: a damaged state, another space or
    other settings, or a context entry that differs (entries `context` does not hold yet are not compared)."""
    _read_state(path, space, settings, context, partial=True)


def _read_state(path: str, space: LevelSpace, settings: SearchSettings, context: dict[str, Any],
                partial: bool = False) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8 text
        raise ValueError(f"resume_from: cannot read search state {path!r}: {err}") from err
    if not isinstance(state, dict):
        raise ValueError(f"resume_from: {path!r} is not an EvoPress search state (a JSON {type(state).__name__}, "
                         "not an object)")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"resume_from: {path!r} is not an EvoPress search state (version {state.get('version')!r})")
    for key, types in _STATE_FIELDS.items():
        if key not in state:
            raise ValueError(f"resume_from: search state {path!r} is damaged: it has no {key!r}")
        if type(state[key]) not in types:
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"resume_from: search state {path!r} is damaged: {key!r} is "
                             f"{type(state[key]).__name__} {state[key]!r:.40}, not {allowed}")
    if state["generation"] < 0:
        raise ValueError(f"resume_from: search state {path!r} is damaged: 'generation' is {state['generation']}, "
                         "not a non-negative integer")
    if not all(type(level) is int for level in state["parent"]):
        raise ValueError(f"resume_from: search state {path!r} is damaged: 'parent' is {state['parent']!r:.40}, "
                         "not a list of integers")
    if state.get("space") != space.fingerprint():
        raise ValueError(f"resume_from: {path!r} was written for another model, method or budget")
    stored = {key: value for key, value in state["context"].items() if key in context} if partial else state["context"]
    differing = differences(stored, context)
    if differing:
        raise ValueError(f"resume_from: {path!r} was written for another run; it differs in {list(differing)}")
    # More generations may be asked for on resume; everything else must match.
    differing = differences(state["settings"], settings.to_dict())
    differing.pop("generations", None)
    if differing:
        detail = "; ".join(f"{key}: state has {old!r}, asked for {new!r}" for key, (old, new) in differing.items())
        raise ValueError(f"resume_from: {path!r} was written with other search settings ({detail})")
    parent = tuple(state["parent"])
    if not space.is_valid(parent):
        raise ValueError(f"resume_from: {path!r} holds an assignment that is not valid in this space")
    return state


def _restore_rng(rng: np.random.Generator, state: dict[str, Any], key: str, path: str) -> None:
    """Puts `rng` in the generator state stored under `key`, refusing a damaged one."""
    try:
        rng.bit_generator.state = state[key]
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        raise ValueError(f"resume_from: search state {path!r} is damaged: {key!r} is not a PCG64 state "
                         f"({type(err).__name__}: {err})") from err


def evolutionary_search(
    space: LevelSpace,
    evaluate: Evaluate,
    settings: SearchSettings,
    checkpoint_path: str | None = None,
    resume_from: str | None = None,
    progress: bool = True,
    seeds: Sequence[Assignment] = (),
    context: dict[str, Any] | None = None,
    write_state: bool = True,
) -> SearchResult:
    """Runs the (1+lambda) evolutionary search of EvoPress on `space`.

    Each generation mutates the parent into `offspring` distinct children (each with
    min(U(1, max_flips), U(1, max_flips)) level switches; the parent and duplicates are rejected),
    selects among them with `multi_step_selection`, and lets the parent compete in the last stage.
    The same seed gives the same result, and a run resumed from a state written after generation g
    continues exactly as the uninterrupted run.

    Args:
        space: units, levels, costs and budget.
        evaluate: scores candidates on a fresh minibatch of tokens (lower is better).
        settings: generations, offspring, selection stages, initial candidates, flips and seed.
        checkpoint_path: where to write the search state after each generation (atomically, so a run
            killed at any moment leaves the state of its last finished generation).
        resume_from: a state written by an earlier run with the same space, settings and context. When it
            is `checkpoint_path` and does not exist yet, the search starts afresh: one command line then
            both starts a run and resumes it after an interruption.
        progress: show a tqdm bar.
        seeds: assignments that join the random ones in the initial pool (e.g. uniform at an integer
            bit-width target); the pool still holds `initial_candidates` in total.
        context: JSON values the state must have been written with to be resumed (e.g. fingerprints of the
            calibration data and the fitness); a state from another run is refused naming what differs.
        write_state: False in processes that follow the main one of a distributed run: they resume from
            `checkpoint_path` like it, but leave the writing to it.
    """
    context = dict(context or {})
    for seed_assignment in seeds:
        if not space.is_valid(seed_assignment):
            raise ValueError(f"evolutionary_search: seed assignment {seed_assignment} is not valid at the budget")
    mutation_rng, data_rng = _new_rngs(settings.seed)
    history: list[dict[str, Any]] = []
    if resume_from is not None and os.path.exists(resume_from):
        state = _read_state(resume_from, space, settings, context)
        parent, parent_fitness = tuple(state["parent"]), state["parent_fitness"]
        _restore_rng(mutation_rng, state, "mutation_rng", resume_from)
        _restore_rng(data_rng, state, "data_rng", resume_from)
        history = state["history"]
        start = state["generation"]
        logger.info("resuming the search at generation %d from %s", start, resume_from)
    else:
        if resume_from is not None and resume_from != checkpoint_path:
            raise FileNotFoundError(f"resume_from: no search state at {resume_from!r}")
        start_time = time.perf_counter()
        pool: list[Assignment] = list(dict.fromkeys(tuple(a) for a in seeds))[:max(settings.initial_candidates, 1)]
        for _ in range(settings.initial_candidates * 4):
            if len(pool) >= settings.initial_candidates:
                break
            candidate = space.random_assignment(mutation_rng)
            if candidate not in pool:
                pool.append(candidate)
            if len(pool) == settings.initial_candidates:
                break
        if len(pool) > 1:
            parent, parent_fitness, used = multi_step_selection(
                pool, evaluate, _fit_stages(settings.survivors_per_selection, len(pool)),
                settings.tokens_per_selection, data_rng,
            )
        else:
            parent, parent_fitness, used = pool[0], None, 0
        history.append({"generation": 0, "fitness": parent_fitness, "tokens": used,
                        "seconds": time.perf_counter() - start_time})
        start = 0

    bar = tqdm(total=settings.generations, initial=min(start, settings.generations), desc="EvoPress search",
               unit="gen", disable=not progress)
    for generation in range(start, settings.generations):
        start_time = time.perf_counter()
        children: list[Assignment] = []
        for _ in range(settings.offspring * 20):
            flips = min(int(mutation_rng.integers(1, settings.max_flips + 1)),
                        int(mutation_rng.integers(1, settings.max_flips + 1)))
            child = level_switch_mutation(space, parent, mutation_rng, flips)
            if child != parent and child not in children:
                children.append(child)
            if len(children) == settings.offspring:
                break
        if not children:
            logger.warning("no assignment differs from the parent; the space is exhausted")
            break
        parent, parent_fitness, used = multi_step_selection(
            children, evaluate, _fit_stages(settings.survivors_per_selection, len(children)),
            settings.tokens_per_selection, data_rng, elite=parent,
        )
        history.append({"generation": generation + 1, "fitness": parent_fitness, "tokens": used,
                        "seconds": time.perf_counter() - start_time})
        if checkpoint_path is not None and write_state:
            _write_state(checkpoint_path, {
                "version": STATE_VERSION,
                "space": space.fingerprint(),
                "settings": settings.to_dict(),
                "context": context,
                "generation": generation + 1,
                "parent": list(parent),
                "parent_fitness": parent_fitness,
                "mutation_rng": _rng_state(mutation_rng),
                "data_rng": _rng_state(data_rng),
                "history": history,
            })
        bar.update(1)
        bar.set_postfix(fitness=f"{parent_fitness:.4g}")
    bar.close()
    return SearchResult(assignment=parent, fitness=parent_fitness, history=history)


def _fit_stages(survivors: Sequence[int], pool_size: int) -> list[int]:
    """Caps the survivors of each stage at the pool size (small spaces may yield fewer offspring)."""
    return [min(keep, pool_size) for keep in survivors]
