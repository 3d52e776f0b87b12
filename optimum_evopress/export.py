"""Writing checkpoints: atomic output directories and the `evopress_config.json` record."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from typing import Any, Callable, Iterator

from .configuration import CONFIG_NAME
from .model_card import write_model_card

__all__ = ["check_output_dir", "atomic_directory", "library_versions", "save_checkpoint"]


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Raises a `ValueError` if `path` is a file, or a non-empty directory and `overwrite` is not set."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"output directory {path!r} is an existing file")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"output directory {path!r} exists and is not empty; pass overwrite=True to replace it")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary directory next to `path` that replaces `path` only when the block succeeds.

    On any error or interruption the temporary directory is removed and `path` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_dir(path, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
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
