"""Writing checkpoints: atomic output directories and the `evopress_config.json` record."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import shutil
from typing import Any, Callable, Iterator

from .configuration import CONFIG_NAME
from .model_card import write_model_card

__all__ = ["check_output_dir", "atomic_directory", "library_versions", "save_checkpoint"]


LEFTOVER_PREFIX = ".evopress-"  # of the temporary entries a write keeps inside an existing output directory
_NEW, _OLD = LEFTOVER_PREFIX + "new-", LEFTOVER_PREFIX + "old-"


def _entries(path: str) -> list[str]:
    """The entries of `path`, without the new files an interrupted write left behind (old ones still count)."""
    return [name for name in os.listdir(path) if not name.startswith(_NEW)]


def _is_checkpoint(path: str) -> bool:
    """Whether `path` holds an EvoPress checkpoint: a model `config.json` and a record with levels (a saved
    `EvoPressConfig` alone is not one)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        with open(os.path.join(path, CONFIG_NAME), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and "levels" in record


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises a `ValueError` unless `path` is new, an empty directory, or (with `overwrite`) an EvoPress checkpoint.

    `overwrite` replaces an earlier checkpoint only: a directory of other files (a base model, a project folder,
    a saved config) is never emptied.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"output directory {path!r} is an existing file")
    if not os.path.isdir(path) or not _entries(path):
        return
    if not _is_checkpoint(path):
        raise ValueError(f"output directory {path!r} is not empty and holds no EvoPress checkpoint; choose a new or "
                         "empty directory (overwrite=True replaces only an earlier checkpoint)")
    if not overwrite:
        raise ValueError(f"output directory {path!r} is not empty: it holds an EvoPress checkpoint; pass "
                         "overwrite=True to replace it")


def _make_dir(parent: str, prefix: str) -> str:
    """A new directory in `parent` with the usual permissions (the umask's, unlike `tempfile.mkdtemp`'s 0700)."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _replace_contents(path: str, new: str) -> None:
    """Moves `path`'s entries aside and `new`'s entries in, then deletes the old ones and `new`; on an error or an
    interruption the moves are undone, so `path` keeps its old files."""
    old = _make_dir(path, _OLD)
    moved: list[tuple[str, str]] = []
    try:
        for name in os.listdir(path):
            if os.path.join(path, name) not in (old, new):
                moved.append((os.path.join(path, name), os.path.join(old, name)))
                os.rename(*moved[-1])
        for name in os.listdir(new):
            moved.append((os.path.join(new, name), os.path.join(path, name)))
            os.rename(*moved[-1])
    except BaseException:
        for source, target in reversed(moved):
            if os.path.lexists(target):
                os.rename(target, source)
        os.rmdir(old)
        raise
    os.rmdir(new)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory whose files become `path`'s only when the block succeeds.

    A new `path` is the temporary directory, renamed. An existing one (empty, or an earlier checkpoint with
    `overwrite`) stays the same directory, with its permissions and mount: the temporary directory is made
    inside it and its entries are swapped in at the end. On any error or interruption the temporary directory is
    removed and `path` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_dir(path, overwrite)
    existing = os.path.isdir(path)
    if not existing:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _make_dir(path, _NEW) if existing else _make_dir(
        os.path.dirname(path), f".{os.path.basename(path)}.tmp-")
    try:
        yield tmp
        if os.path.isdir(path):  # also when another process made it meanwhile
            check_output_dir(path, overwrite)
            _replace_contents(path, tmp)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def library_versions() -> dict[str, str]:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from . import __version__  # noqa: PLC0415

    return {"optimum_evopress": __version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def save_checkpoint(model: Any, save_directory: str | os.PathLike, record: dict[str, Any], tokenizer: Any = None,
                    overwrite: bool = False, save_model: Callable[..., None] | None = None, **save_kwargs: Any) -> None:
    """Writes `model` (and `tokenizer`) plus `evopress_config.json` and the model card, atomically.

    The model is written by `save_model(directory, **save_kwargs)` when given, else by its `save_pretrained`.
    """
    with atomic_directory(save_directory, overwrite=overwrite) as tmp:
        (save_model or model.save_pretrained)(tmp, **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {**record, "versions": library_versions()}
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
        write_model_card(tmp, record)
