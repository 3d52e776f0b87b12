"""Fitness of a compressed model: KL divergence to the dense model, its top-k variant, or perplexity.

The dense model's outputs on the calibration set are computed once and cached on the CPU:

- `kl`: full probabilities in float16, `2 * vocab_size + 8` bytes per token
  (SmolLM2, vocabulary 49,152: 96 KiB per token, 1.5 GiB for 16k tokens). The KL divergence is
  `sum p log p - sum p z + (sum p) logsumexp(z)` for student logits `z`; the first and last sums are
  cached per token, so scoring a candidate reads the logits only twice (one dot product, one logsumexp).
  It is exact for the float16-rounded teacher distribution.
- `topk_kl`: the `k` largest log-probabilities (float32) and their indices (int32),
  `8 * k` bytes per token whatever the vocabulary (k=128: 1 KiB per token, 1 GiB for 2^20 tokens).
  The remaining probability mass forms one extra bucket, so the value is the exact KL divergence
  between the two distributions coarsened to k+1 outcomes (a lower bound of the full KL).
- `ppl`: nothing is cached; the fitness is the mean next-token negative log-likelihood.

All fitness values are means per token; lower is better.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["Minibatch", "draw_minibatch", "FitnessEvaluator", "teacher_cache_bytes"]

# A minibatch is a list of (calibration sequence index, number of leading tokens used).
Minibatch = list[tuple[int, int]]
_KL_CHUNK_CPU, _KL_CHUNK_ACCELERATOR = 64, 8192


def draw_minibatch(num_sequences: int, sequence_length: int, num_tokens: int, rng: np.random.Generator) -> Minibatch:
    """Draws distinct calibration sequences holding exactly `num_tokens` tokens.

    Whole sequences are used first; a remainder uses the first tokens of one more sequence, which gives
    the same outputs as those positions of the full sequence because the models are causal.
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
        batch.append((int(chosen[-1]), rest))
    return batch


def teacher_cache_bytes(kind: str, num_tokens: int, vocab_size: int, topk: int) -> int:
    """Bytes the teacher cache takes for `num_tokens` calibration tokens."""
    if kind == "kl":
        return num_tokens * (vocab_size * 2 + 8)
    if kind == "topk_kl":
        return num_tokens * topk * 8
    return 0


class FitnessEvaluator:
    """Scores the model's current state against the cached dense outputs on calibration minibatches.

    Args:
        model: the causal LM; its current (possibly compressed) state is what `score` measures.
        sequences: calibration token ids, `[num_sequences, sequence_length]`.
        kind: `kl`, `topk_kl` or `ppl`.
        topk: values kept per token for `topk_kl`.
        batch_size: sequences per forward pass.
    """

    def __init__(self, model: torch.nn.Module, sequences: torch.Tensor, kind: str = "kl", topk: int = 128,
                 batch_size: int = 8) -> None:
        if kind not in ("kl", "topk_kl", "ppl"):
            raise ValueError(f"fitness must be one of ('kl', 'topk_kl', 'ppl'), got {kind!r}")
        self.model = model
        self.sequences = sequences
        self.kind = kind
        self.topk = topk
        self.batch_size = batch_size
        self.teacher_probs: torch.Tensor | None = None
        self.teacher_entropy: torch.Tensor | None = None  # sum p log p per token (kl)
        self.teacher_mass: torch.Tensor | None = None  # sum p per token after float16 rounding (kl)
        self.teacher_values: torch.Tensor | None = None
        self.teacher_indices: torch.Tensor | None = None
        self.forward_seconds = 0.0
        self.metric_seconds = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_sequences(self) -> int:
        return self.sequences.shape[0]

    @property
    def sequence_length(self) -> int:
        return self.sequences.shape[1]

    def cache_bytes(self) -> int:
        tensors = (self.teacher_probs, self.teacher_entropy, self.teacher_mass, self.teacher_values,
                   self.teacher_indices)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @torch.no_grad()
    def _logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.model(input_ids=input_ids.to(self.device), use_cache=False).logits.float()
        self.forward_seconds += time.perf_counter() - start
        return logits

    @torch.no_grad()
    def cache_teacher(self, progress: bool = True) -> None:
        """Runs the dense model once over every calibration sequence and stores what the fitness needs."""
        if self.kind == "ppl":
            return
        n = self.sequences.shape[0]
        chunks = []
        for start in tqdm(range(0, n, self.batch_size), desc="dense outputs", disable=not progress):
            logprobs = F.log_softmax(self._logits(self.sequences[start:start + self.batch_size]), dim=-1)
            if self.kind == "kl":
                probs = logprobs.exp().to(torch.float16)
                rounded = probs.float()
                chunks.append((probs.cpu(), (rounded * logprobs).sum(-1).cpu(), rounded.sum(-1).cpu()))
            else:
                values, indices = logprobs.topk(self.topk, dim=-1)
                chunks.append((values.cpu(), indices.to("cpu", torch.int32)))
        if self.kind == "kl":
            self.teacher_probs, self.teacher_entropy, self.teacher_mass = (torch.cat(c) for c in zip(*chunks))
        else:
            self.teacher_values, self.teacher_indices = (torch.cat(c) for c in zip(*chunks))

    def _groups(self, batch: Minibatch) -> list[tuple[list[int], int]]:
        """Groups the minibatch into forward passes of up to `batch_size` sequences of one length."""
        by_length: dict[int, list[int]] = {}
        for index, length in batch:
            by_length.setdefault(length, []).append(index)
        groups = []
        for length, indices in by_length.items():
            for start in range(0, len(indices), self.batch_size):
                groups.append((indices[start:start + self.batch_size], length))
        return groups

    @torch.no_grad()
    def score(self, batch: Minibatch) -> float:
        """Mean per-token fitness of the model's current state on `batch` (lower is better)."""
        if self.kind != "ppl" and self.teacher_probs is None and self.teacher_values is None:
            raise RuntimeError("call cache_teacher() before score()")
        total, count = 0.0, 0
        for indices, length in self._groups(batch):
            index = torch.tensor(indices)
            logits = self._logits(self.sequences[index, :length])
            start = time.perf_counter()
            value, tokens = self._metric(logits, index, length)
            total += value
            count += tokens
            self.metric_seconds += time.perf_counter() - start
        return total / count

    def _metric(self, logits: torch.Tensor, index: torch.Tensor, length: int) -> tuple[float, int]:
        device = logits.device
        if self.kind == "ppl":
            if length < 2:
                return 0.0, 0
            targets = self.sequences[index, 1:length].to(device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            return float(nll), targets.numel()
        if self.kind == "kl":
            probs = self.teacher_probs[index, :length].flatten(0, 1)
            entropy = self.teacher_entropy[index, :length].flatten().to(device)
            mass = self.teacher_mass[index, :length].flatten().to(device)
            logits = logits.flatten(0, 1)
            total = torch.zeros((), device=device)
            # Small chunks of tokens keep the float16 -> float32 conversion in the CPU's cache.
            chunk = _KL_CHUNK_CPU if device.type == "cpu" else _KL_CHUNK_ACCELERATOR
            for start in range(0, logits.shape[0], chunk):
                z = logits[start:start + chunk]
                p = probs[start:start + chunk].to(device, torch.float32, non_blocking=True)
                cross = torch.bmm(p.unsqueeze(1), z.unsqueeze(2)).flatten()
                total += (entropy[start:start + chunk] - cross + mass[start:start + chunk] * torch.logsumexp(z, -1)).sum()
            return float(total), logits.shape[0]
        values = self.teacher_values[index, :length].to(device)
        indices = self.teacher_indices[index, :length].to(device, torch.long)
        student = logits.gather(-1, indices) - torch.logsumexp(logits, -1, keepdim=True)
        probs = values.exp()
        kl = (probs * (values - student)).sum(-1)
        teacher_rest = (1.0 - probs.sum(-1)).clamp_min(1e-12)
        student_rest = (1.0 - student.exp().sum(-1)).clamp_min(1e-12)
        kl = kl + teacher_rest * (teacher_rest.log() - student_rest.log())
        return float(kl.sum()), kl.numel()
