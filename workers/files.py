"""Small file helpers shared by the ranks and the launcher: write a file whole or not at all, read JSON that
may be missing or half-written.

Standard library only: the launcher imports it without paying for torch."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what a plain open() would give a new file (read once, at import)


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` itself durable (a crash right after it keeps the new name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object], *, durable: bool = False) -> None:
    """Write through ``write(fileobj)`` to a temp file beside ``path`` (``.NAME.XXXX.tmp``), then rename it over
    ``path``: a reader (another rank, the launcher, a rerun) sees the old file or the new one, never half of one.
    ``durable``: fsync the file and the directory too, so it survives a machine crash (checkpoints); a record
    that is rewritten often does without that cost."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _MODE)  # mkstemp makes it owner-only: a shared run directory's readers need what open() gives
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """``text`` into ``path``, atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: Path, data: Any, indent: int | None = 1) -> None:
    """``data`` as JSON into ``path``, atomically (:func:`atomic_write`)."""
    write_text(path, json.dumps(data, indent=indent))


def read_json(path: Path) -> Any:
    """The JSON in ``path``; None if it is missing, unreadable or not (yet) whole JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
