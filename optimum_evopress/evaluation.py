"""Perplexity on held-out text, for any causal LM: dense, compressed, or reloaded from disk."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import BUILTIN_CORPORA, load_texts, tokenize_to_sequences
from .models import input_device

__all__ = ["perplexity", "evaluate_perplexity", "check_lm_eval", "run_lm_eval"]


@torch.no_grad()
def perplexity(model: torch.nn.Module, sequences: torch.Tensor, batch_size: int = 8, progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) of `model` over token sequences `[n, length]`."""
    if sequences.ndim != 2 or sequences.shape[1] < 2 or len(sequences) == 0:
        raise ValueError(f"perplexity needs at least one sequence of >= 2 tokens, got shape {tuple(sequences.shape)}")
    device = input_device(model)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(sequences), batch_size), desc="perplexity", disable=not progress):
        batch = sequences[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def evaluate_perplexity(model: torch.nn.Module, tokenizer: Any, dataset: Any = "wikipedia", sequence_length: int = 256,
                        num_tokens: int | None = None, batch_size: int = 8, progress: bool = True, **load_kwargs: Any
                        ) -> float:
    """Perplexity of `model` on held-out text.

    Args:
        model: any causal LM.
        tokenizer: its tokenizer.
        dataset: a built-in corpus (its evaluation part, never used for calibration), a path, a Hub dataset
            name, a `datasets.Dataset` or a list of strings.
        sequence_length: tokens per sequence.
        num_tokens: score only `num_tokens` tokens (rounded up to whole sequences): a built-in corpus's first
            ones, any other source's last ones, which `compress` holds out from calibration with
            `evaluation_tokens=num_tokens` (and the same `sequence_length`).
        load_kwargs: `dataset_config`, `dataset_split`, `text_column` for `load_texts`.
    """
    sequences = tokenize_to_sequences(load_texts(dataset, "evaluation", **load_kwargs), tokenizer, sequence_length)
    if num_tokens is not None:
        count = -(-num_tokens // sequence_length)
        builtin = isinstance(dataset, str) and dataset in BUILTIN_CORPORA
        sequences = sequences[:count] if builtin else sequences[max(0, len(sequences) - count):]
    return perplexity(model, sequences, batch_size=batch_size, progress=progress)


def check_lm_eval() -> None:
    """Raises an `ImportError` naming the extra when lm-evaluation-harness is not installed."""
    import importlib.util  # noqa: PLC0415

    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError("evaluating tasks needs lm-evaluation-harness: pip install 'optimum-evopress[eval]'")


def run_lm_eval(model: torch.nn.Module, tokenizer: Any, tasks: list[str], num_fewshot: int | None = None,
                limit: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Runs lm-evaluation-harness `tasks` on an in-memory model.

    Returns `{"results": {task: metrics}, "skipped": {task: reason}}`: a task whose data cannot be loaded (offline,
    gated, unknown name) is skipped with its reason instead of failing the others.
    """
    check_lm_eval()
    import lm_eval  # noqa: PLC0415
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for task in tasks:
        try:
            output = lm_eval.simple_evaluate(model=wrapped, tasks=[task], num_fewshot=num_fewshot, limit=limit,
                                             log_samples=False)
        except Exception as err:  # noqa: BLE001  (data loading fails in many ways: network, auth, unknown task)
            skipped[task] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            continue
        results.update(output["results"] if output else {})
    return {"results": results, "skipped": skipped}
