"""Fitness of a compressed model: KL divergence to the dense model, two top-k variants, or perplexity.

The dense model's outputs on the calibration set are computed once and cached on the CPU:

- `kl`: the teacher's probabilities projected through the output head, `4 * hidden_size + 8` bytes per
  token (SmolLM2: 2.3 KiB per token, 36 MiB for 16k tokens; Llama-3-8B: 16 KiB per token). For student
  logits `z = W h + b` (output head `W`, `b`; last hidden state `h`) the KL divergence is
  `sum p log p - sum p z + (sum p) logsumexp(z)`, and `sum p z = h . (W^T p) + p . b`: the cache holds
  `W^T p` (hidden-size floats) and the per-token constants, and scoring a candidate computes the head in
  float32, in chunks, for its logsumexp only. The value is the exact KL divergence to the teacher's float32
  distribution; the student's logits are the head applied in float32 to its last hidden states. Models
  whose logits are not that linear head (a final softcap, a logit scale) keep the full probabilities in
  float16 instead, `2 * vocab_size + 8` bytes per token (SmolLM2: 96 KiB, 1.5 GiB for 16k tokens), exact
  for the float16-rounded distribution.
- `topk_kl`: the `k` largest log-probabilities (float32) and their indices (int32),
  `8 * k` bytes per token whatever the vocabulary (k=128: 1 KiB per token, 1 GiB for 2^20 tokens).
  The remaining probability mass forms one extra bucket, so the value is the exact KL divergence
  between the two distributions coarsened to k+1 outcomes (a lower bound of the full KL).
- `topk_kl_renormalized`: the same cache; the value is the KL divergence between the two distributions
  conditioned on the dense model's top-k tokens S (both renormalised over S). It needs the student's
  logits on S only, so the output head computes k of its rows per token instead of the whole vocabulary
  (SmolLM2: 128 of 49,152). It is a different quantity: by the chain rule,
  `KL(k+1 outcomes) = KL(P(S) || Q(S)) + P(S) KL(P|S || Q|S)`, so `P(S) x value <= topk_kl <= kl` per token;
  what it does not see is student mass moved off S.
- `ppl`: nothing is cached; the fitness is the mean next-token negative log-likelihood.

All fitness values are means per token; lower is better.

Prefix reuse: a candidate that differs from a reference state (the search's parent) first in block k
computes the same hidden states as the reference up to block k. `record_prefix` runs the reference on a
minibatch's sequences, keeping the inputs of its blocks (every block's, or every s-th one's within a memory
budget) and its per-token fitness values, per calibration sequence and across calls; `score(batch,
start_block=k)` then replays the kept input nearest below block k and runs only the blocks from there. A
sequence recorded once is not run again while the reference stays the same; when the reference changes
first in block k (`invalidate_prefix(k)`), its kept inputs up to block k stay valid and recording it again
runs only the blocks from there. Each sequence is computed independently of the others in its forward
pass, so the values are those of a full forward pass up to float rounding (bit-identical on CPUs when each
sequence of a forward group holds 12 tokens or more: below that, MKL's `F.linear` may compute a row
differently for another batch).

Partial sequences: a stage's tokens that do not fill a whole sequence are scored as the first tokens of one
more. That needs a prefix to be computed as in the full sequence, which does not hold for RoPE whose
frequencies depend on the sequence length (`longrope`, `dynamic`) once it exceeds the original maximum: there
`FitnessEvaluator.whole_sequences` is set, and the stage scores that sequence whole.

Stacked scoring: `score_stacked(batch, n)` stacks each group's sequences n times and scores part i of the
batch as the i-th of n model states, which `CompressionMethod.stacked` sets up (one forward pass per group
for n candidates).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .configuration import FITNESS_KINDS, TOPK_FITNESS_KINDS
from .models import input_device, stored_weight

__all__ = ["Minibatch", "draw_minibatch", "FitnessEvaluator", "teacher_cache_bytes", "prefix_cache_budget",
           "length_dependent_rope"]

logger = logging.getLogger(__name__)

# A minibatch is a list of (calibration sequence index, number of leading tokens used).
Minibatch = list[tuple[int, int]]
_KL_CHUNK_CPU, _KL_CHUNK_ACCELERATOR = 16, 8192
# Bytes of float32 logits `kl` computes at once through the output head for its logsumexp (larger chunks
# keep the matrix product efficient; SmolLM2: 1,365 tokens on a CPU).
_HEAD_CHUNK_CPU, _HEAD_CHUNK_ACCELERATOR = 256 * 2**20, 2**30
# Bytes of output-head rows `topk_kl_renormalized` gathers at once: on CPUs few enough to stay in cache
# (SmolLM2: 56 tokens' rows), on accelerators enough to keep them busy.
_HEAD_ROWS_CHUNK_CPU, _HEAD_ROWS_CHUNK_ACCELERATOR = 16 * 2**20, 256 * 2**20


def draw_minibatch(num_sequences: int, sequence_length: int, num_tokens: int, rng: np.random.Generator,
                   whole_sequences: bool = False) -> Minibatch:
    """Draws distinct calibration sequences holding exactly `num_tokens` tokens.

    Whole sequences are used first; a remainder uses the first tokens of one more sequence, which gives
    the same outputs as those positions of the full sequence because the models are causal. With
    `whole_sequences` (RoPE that depends on the sequence length) that sequence is used whole instead: the
    same sequences are drawn, holding up to `sequence_length - 1` tokens more.
    """
    full, rest = divmod(num_tokens, sequence_length)
    needed = full + (1 if rest else 0)
    if needed > num_sequences:
        raise ValueError(
            f"a selection stage asks for {num_tokens} tokens but the calibration set holds "
            f"{num_sequences * sequence_length}"
        )
    chosen = rng.choice(num_sequences, size=needed, replace=False)
    batch = [(int(i), sequence_length) for i in chosen[:full]]
    if rest:
        batch.append((int(chosen[-1]), sequence_length if whole_sequences else rest))
    return batch


def length_dependent_rope(config: Any, sequence_length: int) -> str | None:
    """The RoPE type of `config` whose frequencies depend on the sequence length at `sequence_length` tokens, or None.

    `longrope` (Phi-3.5, Phi-4-mini) switches to its long factors, and `dynamic` (NTK) rescales, once a sequence
    exceeds the original maximum (`original_max_position_embeddings`, or `max_position_embeddings`): there a
    prefix of a sequence is not computed as in the full sequence. `rope_parameters` (or the older `rope_scaling`)
    may hold one setting or one per layer type.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(parameters, dict):
        return None
    for entry in [parameters] + [value for value in parameters.values() if isinstance(value, dict)]:
        rope_type = str(entry.get("rope_type", entry.get("type", "default")))
        if rope_type != "longrope" and "dynamic" not in rope_type:  # as transformers' `dynamic_rope_update`
            continue
        limits = [entry.get("original_max_position_embeddings"),
                  getattr(config, "original_max_position_embeddings", None),
                  getattr(config, "max_position_embeddings", None)]
        limits = [limit for limit in limits if isinstance(limit, int)]
        if not limits or sequence_length > min(limits):
            return rope_type
    return None


def teacher_cache_bytes(kind: str, num_tokens: int, vocab_size: int, topk: int, hidden_size: int | None = None) -> int:
    """Bytes the teacher cache takes for `num_tokens` calibration tokens (`kl`: projected through the output
    head when `hidden_size` is given, full probabilities otherwise)."""
    if kind == "kl":
        return num_tokens * (hidden_size * 4 + 8 if hidden_size else vocab_size * 2 + 8)
    if kind in TOPK_FITNESS_KINDS:
        return num_tokens * topk * 8
    return 0


def prefix_cache_budget(device: torch.device) -> int:
    """Bytes the kept block inputs of prefix reuse may take: a quarter of the device's free memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 4
    import psutil  # noqa: PLC0415

    return psutil.virtual_memory().available // 4


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp; on CPUs in pieces of rows small enough to stay in cache for its two passes."""
    if logits.device.type != "cpu":
        return torch.logsumexp(logits, -1)
    return torch.cat([torch.logsumexp(piece, -1) for piece in logits.split(_KL_CHUNK_CPU)])


class _Passthrough(nn.Module):
    """Stands in for a block before the replayed one: the forward pass skips it."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Replay(nn.Module):
    """Stands in for the block before the resumed one: returns the kept input of the resumed block."""

    def __init__(self, hidden_states: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        self.hidden_states, self.as_tuple = hidden_states, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple:
        return (self.hidden_states,) if self.as_tuple else self.hidden_states


def _stack(tensor: torch.Tensor, copies: int) -> torch.Tensor:
    """`tensor` repeated along the batch for `copies` stacked states."""
    return tensor if copies == 1 else tensor.repeat(copies, *[1] * (tensor.dim() - 1))


class _Recorder(nn.Module):
    """Wraps a block and hands its output (the next block's input) to `keep`."""

    def __init__(self, block: nn.Module, keep: Callable[[torch.Tensor, bool], None]) -> None:
        super().__init__()
        self.block, self.keep = block, keep

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        self.keep(out[0] if isinstance(out, tuple) else out, isinstance(out, tuple))
        return out


class FitnessEvaluator:
    """Scores the model's current state against the cached dense outputs on calibration minibatches.

    Args:
        model: the causal LM; its current (possibly compressed) state is what `score` measures.
        sequences: calibration token ids, `[num_sequences, sequence_length]`.
        kind: `kl`, `topk_kl`, `topk_kl_renormalized` or `ppl`.
        topk: values kept per token for the top-k kinds.
        batch_size: sequences per forward pass.
        layers: the model's decoder blocks (`model.model.layers`); enables prefix reuse.
        prefix_budget: bytes the kept block inputs may take (default: `prefix_cache_budget`).
    """

    # `topk_kl_renormalized` computes only the output-head rows it needs, and `kl` caches the teacher projected
    # through the output head. False is the straightforward way, kept for benchmarks/search_speed.py: the model
    # computes its whole head, `kl` caches full probabilities.
    head_shortcuts = True

    def __init__(self, model: torch.nn.Module, sequences: torch.Tensor, kind: str = "kl", topk: int = 128,
                 batch_size: int = 8, layers: nn.ModuleList | None = None, prefix_budget: int | None = None) -> None:
        if kind not in FITNESS_KINDS:
            raise ValueError(f"fitness must be one of {FITNESS_KINDS}, got {kind!r}")
        self.model = model
        self.sequences = sequences
        self.kind = kind
        self.topk = topk
        self.batch_size = batch_size
        # kl: per token, sum p log p - p . b (the terms without the student), sum p, and W^T p (projected) or p.
        self.teacher_offset: torch.Tensor | None = None
        self.teacher_mass: torch.Tensor | None = None
        self.teacher_projection: torch.Tensor | None = None
        self.teacher_probs: torch.Tensor | None = None
        self._projected = False  # kl reads the teacher through the output head (decided by cache_teacher)
        self._head32: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # Top-k log-probabilities (for `topk_kl_renormalized`: renormalised over the top k) and their token ids.
        self.teacher_values: torch.Tensor | None = None
        self.teacher_indices: torch.Tensor | None = None
        self.forward_seconds = 0.0
        self.metric_seconds = 0.0
        self.layers = layers
        self.prefix_budget = prefix_budget
        # Selection stages draw whole sequences only where a prefix is not computed as in the full sequence.
        rope = length_dependent_rope(model.config, self.sequence_length)
        self.whole_sequences = rope is not None
        if rope is not None:
            logger.info("RoPE %r depends on the sequence length beyond the original maximum: selection stages "
                        "score whole calibration sequences", rope)
        # Prefix reuse, per calibration sequence, kept across calls: the reference state's block inputs
        # ({block b: [sequences, tokens, hidden] input of block b}, at the kept blocks `_boundaries`, None before
        # the first record) and per-token fitness values; the tokens each sequence was recorded with, and how
        # many leading blocks of the current reference its kept inputs are valid for (all: values valid too).
        self._kept: dict[int, torch.Tensor] = {}
        self._boundaries: list[int] | None = None
        self._tuple_blocks = False  # the blocks return tuples (the replayed input is returned as one)
        self._reference_values: torch.Tensor | None = None
        self._recorded_length = np.zeros(self.num_sequences, dtype=np.int64)
        self._valid_blocks = np.zeros(self.num_sequences, dtype=np.int64)
        self._head_checked = False  # check_output_head() passed
        self.blocks_run = 0  # decoder blocks run per forward group (times the stacked copies), to measure prefix reuse

    @property
    def device(self) -> torch.device:
        return input_device(self.model)

    @property
    def num_sequences(self) -> int:
        return self.sequences.shape[0]

    @property
    def sequence_length(self) -> int:
        return self.sequences.shape[1]

    def cache_bytes(self) -> int:
        tensors = (self.teacher_offset, self.teacher_mass, self.teacher_projection, self.teacher_probs,
                   self.teacher_values, self.teacher_indices)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def _restricted_head(self) -> bool:
        return self.kind == "topk_kl_renormalized" and self.head_shortcuts

    @property
    def _hidden_outputs(self) -> bool:
        """Whether a scored forward pass stops at the last hidden states (the fitness applies the head itself)."""
        return self._restricted_head or self._projected

    @torch.no_grad()
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.model(input_ids=input_ids.to(self.device), use_cache=False).logits.float()
        self.forward_seconds += time.perf_counter() - start
        return logits

    @torch.no_grad()
    def _outputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What a scored forward pass gives: the logits, or the last hidden states when only head rows are needed."""
        return self._hidden(input_ids) if self._hidden_outputs else self._logits(input_ids)

    @torch.no_grad()
    def _hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        hidden = self.model.model(input_ids=input_ids.to(self.device), use_cache=False).last_hidden_state
        self.forward_seconds += time.perf_counter() - start
        return hidden

    @torch.no_grad()
    def _head_rows(self, hidden: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The logits of the tokens `indices` ([..., k]) from the last hidden states ([..., hidden]), in float32."""
        head = self.model.get_output_embeddings()
        weight = stored_weight(head).to(hidden.device)
        bias = stored_weight(head, "bias")
        k = indices.shape[-1]
        flat_hidden, flat_indices = hidden.reshape(-1, hidden.shape[-1]), indices.reshape(-1, k)
        rows = torch.empty(flat_indices.shape, dtype=torch.float32, device=hidden.device)
        budget = _HEAD_ROWS_CHUNK_CPU if hidden.device.type == "cpu" else _HEAD_ROWS_CHUNK_ACCELERATOR
        chunk = max(1, budget // (k * weight.shape[1] * weight.element_size()))
        for start in range(0, len(flat_indices), chunk):
            ids = flat_indices[start:start + chunk]
            z = torch.matmul(F.embedding(ids, weight), flat_hidden[start:start + chunk].unsqueeze(-1)).squeeze(-1)
            if bias is not None:
                z = z + bias.to(z.device)[ids]
            rows[start:start + chunk] = z
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            rows = torch.tanh(rows / cap) * cap
        return rows.view(indices.shape)

    @torch.no_grad()
    def check_output_head(self) -> None:
        """Checks that the output-head rows reproduce the model's logits, as `topk_kl_renormalized` needs.

        Runs one short calibration sequence; raises a `ValueError` when the model transforms its logits in
        a way the rows do not (for instance a logit scale), before any expensive work.
        """
        logits, hidden = self._probe()
        indices = logits.topk(min(self.topk, logits.shape[-1]), dim=-1).indices
        rows, expected = self._head_rows(hidden, indices), logits.gather(-1, indices)
        tolerance = 0.02 * float(expected.abs().max())
        if not torch.allclose(rows.to(expected.device), expected, rtol=0.02, atol=tolerance):
            difference = float((rows.to(expected.device) - expected).abs().max())
            raise ValueError(
                f"fitness='topk_kl_renormalized' computes logits as output-head rows applied to the last hidden "
                f"states, but for {type(self.model).__name__} they differ from the model's logits by up to "
                f"{difference:.3g}; use fitness='topk_kl' or 'kl'")
        self._head_checked = True

    @torch.no_grad()
    def _probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits and last hidden states on one short calibration sequence, to check the head against."""
        input_ids = self.sequences[:1, :32]
        return self._logits(input_ids), self._hidden(input_ids)

    def _head_float32(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output head's weight and bias in float32 on `device`, kept (a float32 head there is not copied)."""
        if self._head32 is None or self._head32[0].device != device:
            head = self.model.get_output_embeddings()
            weight, bias = stored_weight(head), stored_weight(head, "bias")
            self._head32 = (weight.to(device, torch.float32),
                            None if bias is None else bias.to(device, torch.float32))
        return self._head32

    def _head_chunks(self, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, float]]:
        """Float32 logits of the rows of `hidden` ([tokens, hidden]) through the output head, chunk by chunk, with
        the seconds the chunk's product took."""
        weight, bias = self._head_float32(hidden.device)
        budget = _HEAD_CHUNK_CPU if hidden.device.type == "cpu" else _HEAD_CHUNK_ACCELERATOR
        chunk = max(1, budget // (4 * weight.shape[0]))
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            clock = time.perf_counter()
            logits = F.linear(hidden[rows].float(), weight, bias)
            yield rows, logits, time.perf_counter() - clock

    @torch.no_grad()
    def _head_is_linear(self) -> bool:
        """Whether the model's logits are its output head applied to the last hidden states, as the projected
        `kl` cache needs (not so with a final softcap or a logit scale)."""
        if getattr(self.model.config, "final_logit_softcapping", None):
            return False
        logits, hidden = (t[0] for t in self._probe())
        linear = torch.cat([z for _, z, _ in self._head_chunks(hidden)]).to(logits.device)
        return torch.allclose(linear, logits, rtol=0.01, atol=0.01 * float(logits.abs().max()))

    @contextlib.contextmanager
    def _swapped_blocks(self, replacements: dict[int, nn.Module]) -> Iterator[None]:
        originals = {i: self.layers[i] for i in replacements}
        for i, module in replacements.items():
            self.layers[i] = module
        try:
            yield
        finally:
            for i, module in originals.items():
                self.layers[i] = module

    def _memory_budget(self) -> int:
        """Bytes the kept block inputs, or the stacked outputs, may take."""
        return self.prefix_budget if self.prefix_budget is not None else prefix_cache_budget(self.device)

    def _stride(self, tokens: int, hidden_bytes: int) -> int:
        """Keep the input of every s-th block, with s the smallest that fits the budget (0: keep none)."""
        total = tokens * hidden_bytes * (len(self.layers) - 1)
        budget = self._memory_budget()
        if total == 0 or budget < tokens * hidden_bytes:
            return 0
        return max(1, math.ceil(total / budget))

    def _resume_block(self, limit: int) -> int:
        """The kept block input nearest at or below block `limit` (0: none, run from the embeddings)."""
        return max((b for b in self._boundaries or () if b <= limit), default=0)

    def _valid_for(self, index: int, length: int) -> int:
        """Leading blocks of the reference that sequence `index`'s kept inputs are valid for at `length` tokens."""
        return int(self._valid_blocks[index]) if self._recorded_length[index] == length else 0

    def invalidate_prefix(self, unchanged_blocks: int = 0) -> None:
        """The reference state changes; its first `unchanged_blocks` blocks stay as they were (0: all may change).

        The kept inputs of those blocks stay valid, so `record_prefix` runs only the blocks after them again.
        """
        np.minimum(self._valid_blocks, unchanged_blocks, out=self._valid_blocks)

    def prefix_work(self, batch: Minibatch) -> int:
        """Block-tokens `record_prefix(batch)` would run: its sequences not yet recorded for the current reference."""
        n = len(self.layers) if self.layers is not None else 0
        return sum(length * (n - self._resume_block(self._valid_for(index, length)))
                   for index, length in batch if self._valid_for(index, length) < n)

    @torch.no_grad()
    def record_prefix(self, batch: Minibatch) -> float:
        """Scores the reference state on `batch` like `score`, keeping its block inputs for `score(start_block=)`.

        The model's current state is the reference. Sequences recorded before for it (see `invalidate_prefix`)
        are not run again: their kept values give their part of the score.
        """
        if self.layers is None:
            raise RuntimeError("prefix reuse needs the decoder blocks: FitnessEvaluator(..., layers=...)")
        if len({index for index, _ in batch}) < len(batch):
            raise ValueError("record_prefix: the minibatch holds a calibration sequence twice")
        n = len(self.layers)
        if self._boundaries is None:
            reference = next(self.model.parameters())
            stride = self._stride(self.num_sequences * self.sequence_length,
                                  self.model.config.hidden_size * reference.element_size())
            self._boundaries = [b for b in range(1, n) if stride and b % stride == 0]
            self._reference_values = torch.zeros(self.num_sequences, self.sequence_length)
        todo: dict[tuple[int, int], Minibatch] = {}
        for index, length in batch:
            valid = self._valid_for(index, length)
            if valid < n:  # grouped by length and the kept input each can resume from
                todo.setdefault((length, self._resume_block(valid)), []).append((index, length))
                self._valid_blocks[index], self._recorded_length[index] = valid, length
        for (_, resume), part in todo.items():
            for (index, _), tokens in zip(part, self._run(part, resume, record=True)[0]):
                self._reference_values[index, :len(tokens)] = torch.from_numpy(tokens)
                self._valid_blocks[index] = n
        return self._mean([self._reference_values[index, :self._scored_tokens(length)].numpy()
                           for index, length in batch])

    def clear_prefix(self) -> None:
        """Forgets the recorded reference and frees its kept block inputs."""
        self._kept, self._boundaries, self._reference_values = {}, None, None
        self._valid_blocks[:] = 0
        self._recorded_length[:] = 0

    def _keeper(self, boundary: int, index: torch.Tensor, length: int) -> Callable[[torch.Tensor, bool], None]:
        """Writes block `boundary`'s input for the sequences `index` into the kept inputs."""
        def keep(hidden: torch.Tensor, as_tuple: bool) -> None:
            store = self._kept.get(boundary)
            if store is None:
                store = self._kept[boundary] = hidden.new_empty(
                    (self.num_sequences, self.sequence_length, hidden.shape[-1]))
            store[index.to(store.device), :length] = hidden
            self._tuple_blocks = as_tuple

        return keep

    @torch.no_grad()
    def cache_teacher(self, progress: bool = True) -> None:
        """Runs the dense model once over every calibration sequence and stores what the fitness needs."""
        if self.kind == "ppl":
            return
        if self._restricted_head and not self._head_checked:
            self.check_output_head()
        self._projected = self.kind == "kl" and self.head_shortcuts and self._head_is_linear()
        n = self.sequences.shape[0]
        chunks = []
        for start in tqdm(range(0, n, self.batch_size), desc="dense outputs", disable=not progress):
            input_ids = self.sequences[start:start + self.batch_size]
            if self._projected:
                chunks.append(self._project_teacher(self._hidden(input_ids)))
                continue
            logprobs = F.log_softmax(self._logits(input_ids), dim=-1)
            if self.kind == "kl":
                probs = logprobs.exp().to(torch.float16)
                rounded = probs.float()
                chunks.append((probs.cpu(), (rounded * logprobs).sum(-1).cpu(), rounded.sum(-1).cpu()))
            else:
                values, indices = logprobs.topk(self.topk, dim=-1)
                if self.kind == "topk_kl_renormalized":
                    values = values - torch.logsumexp(values, -1, keepdim=True)
                chunks.append((values.cpu(), indices.to("cpu", torch.int32)))
        if self._projected:
            self.teacher_offset, self.teacher_mass, self.teacher_projection = (torch.cat(c) for c in zip(*chunks))
        elif self.kind == "kl":
            self.teacher_probs, self.teacher_offset, self.teacher_mass = (torch.cat(c) for c in zip(*chunks))
        else:
            self.teacher_values, self.teacher_indices = (torch.cat(c) for c in zip(*chunks))

    def _project_teacher(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per token of `hidden` ([sequences, tokens, hidden]): sum p log p - p . b, sum p and W^T p on the CPU."""
        weight, bias = self._head_float32(hidden.device)
        flat = hidden.reshape(-1, hidden.shape[-1])
        offset, mass = (torch.empty(flat.shape[0]) for _ in range(2))
        projection = torch.empty(flat.shape[0], flat.shape[1])
        for rows, logits, _ in self._head_chunks(flat):
            logprobs = F.log_softmax(logits, dim=-1)
            probs = logprobs.exp()
            constant = (probs * logprobs).sum(-1) - (probs @ bias if bias is not None else 0)
            offset[rows], mass[rows] = constant.cpu(), probs.sum(-1).cpu()
            projection[rows] = (probs @ weight).cpu()
        shape = hidden.shape[:-1]
        return offset.view(shape), mass.view(shape), projection.view(*shape, -1)

    def _groups(self, batch: Minibatch) -> list[tuple[list[int], int]]:
        """Groups the minibatch into forward passes of up to `batch_size` sequences of one length (their
        positions in `batch`)."""
        by_length: dict[int, list[int]] = {}
        for position, (_, length) in enumerate(batch):
            by_length.setdefault(length, []).append(position)
        groups = []
        for length, positions in by_length.items():
            for start in range(0, len(positions), self.batch_size):
                groups.append((positions[start:start + self.batch_size], length))
        return groups

    def _scored_tokens(self, length: int) -> int:
        """Tokens with a fitness value in a sequence of `length` tokens (perplexity: those with a next token)."""
        return max(length - 1, 0) if self.kind == "ppl" else length

    @staticmethod
    def _mean(values: list[np.ndarray]) -> float:
        """Mean of per-token values: an exactly rounded sum, whatever the order or grouping of the tokens."""
        count = sum(len(v) for v in values)
        return math.fsum(np.concatenate(values).tolist()) / count if count else 0.0

    @torch.no_grad()
    def score(self, batch: Minibatch, start_block: int = 0) -> float:
        """Mean per-token fitness of the model's current state on `batch` (lower is better).

        Args:
            start_block: the first block in which the current state differs from the reference state that
                `record_prefix` recorded; the blocks before it are not run again where the batch's sequences
                have kept inputs.
        """
        return self.score_stacked(batch, 1, start_block)[0]

    @torch.no_grad()
    def score_stacked(self, batch: Minibatch, copies: int, start_block: int = 0) -> list[float]:
        """Scores `copies` model states in one forward pass per group: `batch`'s sequences are stacked `copies`
        times, and part i of the stacked rows is scored as state i (what `CompressionMethod.stacked` sets up).

        Args:
            start_block: the first block in which any of the states differs from the reference state that
                `record_prefix` recorded.
        """
        return [self._mean(values) for values in self._run(batch, start_block, copies)]

    def stack_limit(self, batch: Minibatch) -> int:
        """How many states `score_stacked` may score at once on `batch` within the memory budget of prefix reuse."""
        config = self.model.config
        rows = max(len(positions) * length for positions, length in self._groups(batch))
        width = config.hidden_size if self._hidden_outputs else config.vocab_size
        inner = max(config.hidden_size, getattr(config, "intermediate_size", None) or 4 * config.hidden_size)
        # Per stacked copy, in float32: the outputs and as much again for the fitness's temporaries, and a
        # few activations of the widest layer inside a block.
        per_copy = rows * 4 * (2 * width + 4 * inner)
        return max(1, self._memory_budget() // per_copy)

    def _run(self, batch: Minibatch, start_block: int = 0, copies: int = 1,
             record: bool = False) -> list[list[np.ndarray]]:
        """Per-token fitness values of each sequence of `batch`, for each of the `copies` stacked states.

        Each forward group resumes from the kept input nearest below `start_block` that is valid for all its
        sequences. With `record`, the current state is the reference: the inputs of the kept blocks after the
        resumed one are written to the kept inputs.
        """
        if self.kind != "ppl" and self.teacher_offset is None and self.teacher_values is None:
            raise RuntimeError("call cache_teacher() before score()")
        values: list[list[np.ndarray]] = [[np.empty(0, np.float32)] * len(batch) for _ in range(copies)]
        for positions, length in self._groups(batch):
            indices = [batch[position][0] for position in positions]
            index = torch.tensor(indices)
            resume = 0
            if self.layers is not None and start_block > 0:
                resume = self._resume_block(min([start_block] + [self._valid_for(i, length) for i in indices]))
            replacements: dict[int, nn.Module] = {}
            if resume:
                kept = self._kept[resume]
                replacements = {i: _Passthrough() for i in range(resume - 1)}
                replacements[resume - 1] = _Replay(_stack(kept[index.to(kept.device), :length], copies),
                                                   self._tuple_blocks)
            if record:
                for b in self._boundaries:
                    if b > resume:
                        replacements[b - 1] = _Recorder(self.layers[b - 1], self._keeper(b, index, length))
            with self._swapped_blocks(replacements):
                outputs = self._outputs(_stack(self.sequences[index, :length], copies))
            if self.layers is not None:
                self.blocks_run += (len(self.layers) - resume) * copies
            if self.kind == "topk_kl_renormalized":  # the student's logits on the teacher's top k (head work)
                start = time.perf_counter()
                top = _stack(self.teacher_indices[index, :length].to(outputs.device, torch.long), copies)
                outputs = self._head_rows(outputs, top) if self.head_shortcuts else outputs.gather(-1, top)
                self.forward_seconds += time.perf_counter() - start
            start = time.perf_counter()
            for copy, logits in enumerate(outputs.chunk(copies)):
                per_token = self._metric(logits, index, length).to("cpu", torch.float32).numpy()
                for position, tokens in zip(positions, per_token):
                    values[copy][position] = tokens
            self.metric_seconds += time.perf_counter() - start
        return values

    def _metric(self, logits: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
        """Per-token fitness values, `[sequences, scored tokens]`, of one forward group's outputs."""
        device = logits.device
        if self.kind == "ppl":
            targets = self.sequences[index, 1:length].to(device)
            return F.cross_entropy(logits[:, :length - 1].transpose(1, 2), targets, reduction="none")
        if self._projected:  # `logits` holds the student's last hidden states
            hidden = logits.reshape(-1, logits.shape[-1])
            offset, mass, projection = (t[index, :length].flatten(0, 1).to(device) for t in (
                self.teacher_offset, self.teacher_mass, self.teacher_projection))
            logsumexp, head_seconds = torch.empty_like(offset), 0.0
            for rows, z, seconds in self._head_chunks(hidden):
                logsumexp[rows] = _logsumexp(z)
                head_seconds += seconds
            self.forward_seconds += head_seconds  # the output head's product is forward work, as in the model
            self.metric_seconds -= head_seconds
            kl = offset - torch.linalg.vecdot(hidden.float(), projection) + mass * logsumexp
            return kl.view(len(index), length)
        if self.kind == "kl":
            kl = torch.empty(len(index), length, device=device)
            # Each sequence's cached rows are read in place (a view, no gathered copy), in chunks of tokens small
            # enough that a chunk's logits and float32 probabilities stay in the CPU's cache for both passes.
            chunk = _KL_CHUNK_CPU if device.type == "cpu" else _KL_CHUNK_ACCELERATOR
            for row, sequence in enumerate(index.tolist()):
                probs = self.teacher_probs[sequence, :length]
                offset = self.teacher_offset[sequence, :length].to(device)
                mass = self.teacher_mass[sequence, :length].to(device)
                for start in range(0, length, chunk):
                    z = logits[row, start:start + chunk]
                    p = probs[start:start + chunk].to(device, torch.float32, non_blocking=True)
                    kl[row, start:start + chunk] = (offset[start:start + chunk] - torch.linalg.vecdot(p, z)
                                                    + mass[start:start + chunk] * torch.logsumexp(z, -1))
            return kl
        values = self.teacher_values[index, :length].to(device)
        if self.kind == "topk_kl_renormalized":  # `logits` holds the student's logits on the teacher's top k
            student = logits - torch.logsumexp(logits, -1, keepdim=True)
            return (values.exp() * (values - student)).sum(-1)
        indices = self.teacher_indices[index, :length].to(device, torch.long)
        student = logits.gather(-1, indices) - torch.logsumexp(logits, -1, keepdim=True)
        probs = values.exp()
        kl = (probs * (values - student)).sum(-1)
        teacher_rest = (1.0 - probs.sum(-1)).clamp_min(1e-12)
        student_rest = (1.0 - student.exp().sum(-1)).clamp_min(1e-12)
        return kl + teacher_rest * (teacher_rest.log() - student_rest.log())
