"""The database of per-layer variants (e.g. one GPTQ solution per bit-width), in memory or on disk.

On disk a database is a directory holding one safetensors file per layer and `manifest.json`,
written last. The manifest records what the variants were built from (model weights, calibration
tokens, method settings, as hashes and values) and a SHA-256 of every layer file. Opening a
database checks both: a database built with other settings, for another model or other data, or
with a damaged file is refused with an error that names the difference; it is never silently used.

While a database is being built, `progress.json` (rewritten atomically after every layer) holds the
same record for the layers finished so far. A build that was interrupted, even by SIGKILL, is
continued by `VariantDatabase.start` from the first missing layer, under the same checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .records import differences, write_atomically

__all__ = ["VariantDatabase", "MANIFEST_NAME", "PROGRESS_NAME", "tensor_fingerprint"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"
FORMAT_VERSION = 1


def tensor_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 over the bytes, shapes and dtypes of `tensors`, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _layer_file(name: str) -> str:
    return f"{name}.safetensors"


def _check_settings(directory: str, stored: dict[str, Any], settings: dict[str, Any], what: str) -> None:
    differing = differences(stored, settings)
    if differing:
        detail = "; ".join(f"{key}: database has {old!r}, asked for {new!r}" for key, (old, new) in differing.items())
        raise ValueError(f"{what} {directory!r} was built with other settings ({detail}); use another "
                         "database_dir or delete this one to rebuild")


def _read_record(directory: str, name: str, what: str) -> dict[str, Any]:
    path = os.path.join(directory, name)
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8 text
        raise ValueError(f"{what} {directory!r}: cannot read {name} ({err}); delete the directory to rebuild") from err
    if not isinstance(record, dict):
        raise ValueError(f"{what} {directory!r}: {name} is damaged (a JSON {type(record).__name__}, not an object); "
                         "delete the directory to rebuild")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{what} {directory!r}: format version {record.get('format_version')!r}, this release reads "
                         f"{FORMAT_VERSION}; rebuild it in an empty directory")
    problem = _record_problem(record)
    if problem:
        raise ValueError(f"{what} {directory!r}: {name} is damaged ({problem}); delete the directory to rebuild")
    return record


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a manifest or progress record, or None."""
    for key in ("settings", "layers", "errors"):
        if key not in record:
            return f"it has no {key!r}"
        if not isinstance(record[key], dict):
            return f"{key!r} is a {type(record[key]).__name__}, not an object"
    for layer, entry in record["layers"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("sha256"), str)
                and type(entry.get("bytes")) is int):
            return f"layer {layer!r} needs a 'file', a 'sha256' and 'bytes'"
        if not isinstance(record["errors"].get(layer), dict):
            return f"layer {layer!r} has no errors"
    return None


class VariantDatabase:
    """Tensors of every variant of every layer, plus each variant's error.

    Args:
        settings: what the variants depend on (method settings, model and calibration fingerprints);
            stored in the manifest and compared when the database is opened again.
        directory: where to keep the database on disk; `None` keeps it in memory only.
        in_memory: hold every layer's tensors in memory (else they are read through memory maps on use).
        writable: write layer files and records to `directory` (False in the non-main processes of a
            distributed build: they keep what they are given in memory, and the main process writes).
    """

    def __init__(self, settings: dict[str, Any], directory: str | os.PathLike | None = None,
                 in_memory: bool = True, writable: bool = True) -> None:
        if directory is None and not in_memory:
            raise ValueError("a database kept off memory needs a directory")
        self.settings = settings
        self.directory = os.fspath(directory) if directory is not None else None
        self.in_memory = in_memory
        self.writable = writable
        self.errors: dict[str, dict[str, float]] = {}
        self._files: dict[str, dict[str, Any]] = {}
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ building
    def add_layer(self, name: str, tensors: dict[str, torch.Tensor], errors: dict[Any, float]) -> None:
        """Stores one layer's variant tensors and per-variant errors (written to disk at once if on disk)."""
        self.errors[name] = {str(level): float(error) for level, error in errors.items()}
        tensors = {key: value.detach().contiguous().cpu() for key, value in tensors.items()}
        if self.directory is not None and self.writable:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, _layer_file(name))
            write_atomically(path, lambda tmp: save_file(tensors, tmp), ".safetensors")
            self._files[name] = {"file": _layer_file(name), "sha256": _file_sha256(path),
                                 "bytes": os.path.getsize(path)}
            self._write_record(PROGRESS_NAME)
        else:
            self._files[name] = {"bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
        if self.in_memory or not self.writable:
            self._tensors[name] = tensors

    def has_layer(self, name: str) -> bool:
        """Whether the variants of layer `name` are stored (a continued build skips such layers)."""
        return name in self._files

    def finish(self) -> None:
        """Writes the manifest (last, so a partial build never looks complete); nothing to do in memory."""
        if self.directory is None or not self.writable:
            return
        self._write_record(MANIFEST_NAME)
        progress = os.path.join(self.directory, PROGRESS_NAME)
        if os.path.exists(progress):
            os.remove(progress)

    def _write_record(self, name: str) -> None:
        record = {"format_version": FORMAT_VERSION, "settings": self.settings, "layers": self._files,
                  "errors": self.errors}

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(record, handle, indent=1, sort_keys=True)

        write_atomically(os.path.join(self.directory, name), write, ".json")

    @classmethod
    def start(cls, settings: dict[str, Any], directory: str | os.PathLike | None = None,
              in_memory: bool = True, writable: bool = True) -> "VariantDatabase":
        """A database to build: empty, or holding the layers an interrupted build in `directory` finished.

        Raises:
            ValueError: the interrupted build used other settings, or one of its layer files is damaged.
        """
        database = cls(settings, directory, in_memory, writable)
        if directory is None or not os.path.isfile(os.path.join(database.directory, PROGRESS_NAME)):
            return database
        record = _read_record(database.directory, PROGRESS_NAME, "partial database")
        _check_settings(database.directory, record["settings"], settings, "partial database")
        for name, entry in record["layers"].items():
            database._load_layer(name, entry, record["errors"][name])
        logger.info("continuing the database build in %s: %d layers already done", database.directory,
                    len(record["layers"]))
        return database

    def _load_layer(self, name: str, entry: dict[str, Any], errors: dict[str, float]) -> None:
        path = os.path.join(self.directory, entry["file"])
        if not os.path.isfile(path):
            raise ValueError(f"database {self.directory!r}: file {entry['file']} is missing")
        if _file_sha256(path) != entry["sha256"]:
            raise ValueError(f"database {self.directory!r}: file {entry['file']} is damaged (checksum mismatch); "
                             "delete the directory to rebuild")
        self._files[name] = entry
        self.errors[name] = errors
        if self.in_memory:
            with safe_open(path, framework="pt") as handle:
                self._tensors[name] = {key: handle.get_tensor(key) for key in handle.keys()}

    # ------------------------------------------------------------------ opening
    @staticmethod
    def exists(directory: str | os.PathLike | None) -> bool:
        return directory is not None and os.path.isfile(os.path.join(directory, MANIFEST_NAME))

    @classmethod
    def open(cls, directory: str | os.PathLike, settings: dict[str, Any], layers: Iterable[str],
             in_memory: bool = True) -> "VariantDatabase":
        """Opens a complete database, checking it was built with `settings` for `layers` and is undamaged.

        Raises:
            ValueError: the settings, the layers or a file's checksum differ, naming what differs.
        """
        directory = os.fspath(directory)
        manifest = _read_record(directory, MANIFEST_NAME, "database")
        _check_settings(directory, manifest["settings"], settings, "database")
        layers = list(layers)
        missing = [name for name in layers if name not in manifest["layers"]]
        if missing:
            raise ValueError(f"database {directory!r} has no variants for layers {missing[:5]}")
        database = cls(settings, directory, in_memory)
        for name in layers:
            database._load_layer(name, manifest["layers"][name], manifest["errors"][name])
        return database

    # ------------------------------------------------------------------ reading
    def tensor(self, name: str, key: str) -> torch.Tensor:
        """One variant tensor of layer `name` (from memory, or read through a memory map)."""
        if name in self._tensors:
            return self._tensors[name][key]
        with safe_open(os.path.join(self.directory, self._files[name]["file"]), framework="pt") as handle:
            return handle.get_tensor(key)

    @property
    def size_bytes(self) -> int:
        """Bytes of all variant tensors (on disk: of the layer files)."""
        return sum(entry["bytes"] for entry in self._files.values())
