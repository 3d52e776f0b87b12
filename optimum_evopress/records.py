"""Small helpers for the JSON records a run leaves on disk (database manifests, search states)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

__all__ = ["write_atomically", "differences"]


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """Calls `write(temporary path)` next to `path`, then renames it over `path`; no partial file is left."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{key: (stored value, wanted value)}` for every key whose values differ, sorted by key.

    `wanted` is compared in its JSON form, so tuples equal the lists a record read back holds.
    """
    wanted = json.loads(json.dumps(wanted))
    return {key: (stored.get(key), wanted.get(key))
            for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)}
