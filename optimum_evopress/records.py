"""Small helpers for the JSON records a run leaves on disk (database manifests, search states)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from typing import Any, Callable

__all__ = ["write_atomically", "differences"]


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], suffix: str = "") -> None:
    """Calls `write(temporary path)` next to `path`, then renames it over `path`; no partial file is left.

    The file gets the mode of any new file (0o666 less the umask: a shared directory stays readable), and it
    and the rename are synced to disk, so after a crash or a power loss `path` holds the old or the new content.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}{suffix}")
    # Created as any new file is, so its mode is 0o666 less the umask (mkstemp's would be 0o600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # `write` may have put a file of its own there (safetensors' is 0o600)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """Syncs `directory`'s entries (a rename in it) to disk; best effort, as some platforms cannot open directories."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{key: (stored value, wanted value)}` for every key whose values differ, sorted by key.

    `wanted` is compared in its JSON form, so tuples equal the lists a record read back holds.
    """
    wanted = json.loads(json.dumps(wanted))
    return {key: (stored.get(key), wanted.get(key))
            for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)}
