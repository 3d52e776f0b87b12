"""Scoring a selection stage's candidates on the model: swaps, prefix reuse, stacking, and sharing across processes."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Sequence

import numpy as np

from .distributed import ProcessGroup
from .fitness import FitnessEvaluator, draw_minibatch
from .methods import CompressionMethod
from .search import Assignment

__all__ = ["CandidateScorer"]


class CandidateScorer:
    """The search's `evaluate`: puts each candidate in place and scores it on one fresh minibatch (of whole
    sequences only where the evaluator's `whole_sequences` says a prefix is not computed as in the full sequence).

    Args:
        method: puts the model in a candidate's state (`set_levels`) and says which block each unit is in.
        evaluator: the fitness, with the dense outputs cached.
        group: the processes sharing the candidates (each scores every `world_size`-th one).
        reuse_prefix: run each candidate from its first block that differs from the reference (the parent),
            from the parent's block inputs, which the evaluator keeps per calibration sequence across calls
            while the parent stays (and, for the blocks before its first change, when it changes).
        candidate_batch_size: candidates scored together in one forward pass per group of sequences (their
            sequences stacked, `CompressionMethod.stacked`), at most as many as `FitnessEvaluator.stack_limit`
            allows. Candidates are stacked in the order of their first changed block, each stack running from
            the first one's. The method must implement `stacked` when it is above 1 (`EvoPressCompressor.compress`
            checks that before any work).
    """

    def __init__(self, method: CompressionMethod, evaluator: FitnessEvaluator, group: ProcessGroup,
                 reuse_prefix: bool = True, candidate_batch_size: int = 1) -> None:
        self.method, self.evaluator, self.group = method, evaluator, group
        self.candidate_batch_size = candidate_batch_size
        self.unit_blocks = method.unit_blocks() if reuse_prefix else None
        self.num_blocks = len(evaluator.layers) if evaluator.layers is not None else 0
        self.swap_seconds = 0.0
        self._reference: Assignment | None = None  # the reference the evaluator keeps block inputs of

    def _set(self, assignment: Sequence[int]) -> None:
        start = time.perf_counter()
        self.method.set_levels(assignment)
        self.swap_seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def _stacked(self, assignments: Sequence[Assignment]) -> Iterator[None]:
        start = time.perf_counter()
        with self.method.stacked(assignments):
            self.swap_seconds += time.perf_counter() - start
            yield
            start = time.perf_counter()
        self.swap_seconds += time.perf_counter() - start

    def _first_changed_block(self, candidate: Sequence[int], reference: Sequence[int]) -> int:
        changed = [self.unit_blocks[u] for u, (a, b) in enumerate(zip(candidate, reference)) if a != b]
        return min(changed, default=self.num_blocks)

    def _follow(self, reference: Assignment) -> None:
        """Tells the evaluator which of the kept block inputs stay valid for a new reference."""
        if reference != self._reference:
            unchanged = 0 if self._reference is None else self._first_changed_block(reference, self._reference)
            self.evaluator.invalidate_prefix(unchanged)
            self._reference = reference

    def __call__(self, candidates: Sequence[Assignment], num_tokens: int, rng: np.random.Generator,
                 reference: Assignment | None = None) -> list[float]:
        # Every process draws the same minibatch and scores its share of the candidates.
        batch = draw_minibatch(self.evaluator.num_sequences, self.evaluator.sequence_length, num_tokens, rng,
                               self.evaluator.whole_sequences)
        mine = list(range(self.group.rank, len(candidates), self.group.world_size))
        starts = dict.fromkeys(mine, 0)
        scores: dict[int, float] = {}
        if reference is not None and self.unit_blocks is not None and self.num_blocks:
            reference = tuple(reference)
            self._follow(reference)
            starts = {index: self._first_changed_block(candidates[index], reference) for index in mine}
            scored = [index for index in mine if tuple(candidates[index]) == reference]
            # Recording runs the reference where its block inputs are not kept yet: worth it when the reference
            # is scored anyway, or when the candidates skip more block-tokens than that costs.
            work = self.evaluator.prefix_work(batch)
            if scored or sum(starts.values()) * num_tokens > work:
                if work:
                    self._set(reference)
                reference_score = self.evaluator.record_prefix(batch)
                scores.update(dict.fromkeys(scored, reference_score))
        todo = [index for index in mine if index not in scores]
        size = max(1, min(self.candidate_batch_size, len(todo)))
        if size > 1:
            size = min(size, self.evaluator.stack_limit(batch))
            todo.sort(key=lambda index: starts[index])  # stable; a stack runs from its first member's block
        for first in range(0, len(todo), size):
            chunk = todo[first:first + size]
            if len(chunk) == 1:
                self._set(candidates[chunk[0]])
                scores[chunk[0]] = self.evaluator.score(batch, starts[chunk[0]])
                continue
            with self._stacked([candidates[index] for index in chunk]):
                scores.update(zip(chunk, self.evaluator.score_stacked(batch, len(chunk), starts[chunk[0]])))
        for part in self.group.all_gather(scores):
            scores.update(part)
        return [scores[index] for index in range(len(candidates))]
