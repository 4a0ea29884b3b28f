"""How far this rank got — phase and step — in a small file the launcher reads to find a stuck rank.

``RUN_DIR/attempts/<N>/rank<R>.progress`` holds one JSON line of a fixed width, rewritten in place
through a shared memory map (no system call; about half a microsecond; a ``pwrite`` where the
filesystem cannot map it), no fsync: the launcher reads the page cache, or the shared filesystem's
view of it, so reporting every step costs nothing measurable. The phases are
``init`` (start-up until the first step), ``data`` (a step waiting for its batch), ``step``,
``eval``, ``checkpoint``, ``done`` and ``failed``; the
launcher gives each its own timeout (``--init-timeout``, ``--hang-timeout``, ``--checkpoint-timeout``).

``workers.rank`` opens the file when the rank starts; the built-in trainer reports its phases and
steps. A user's own script may call :func:`step` too. Without a launcher (no ``LAUNCHER_RUN_DIR``)
every call is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import time
from pathlib import Path

from workers.contract import DATA, DONE, INIT

WIDTH = 255  # the record is padded to this width, so a shorter rewrite leaves no tail of the last one

_fd: int | None = None
_map: mmap.mmap | None = None  # the file, mapped: a write is a memory copy
_width = WIDTH  # WIDTH, or more for a long head (a long host name)
_head = ""  # the fixed part of the record: rank, host, pid, attempt
_phase, _step, _steps, _first = INIT, -1, 0, 0.0  # _steps: steps begun in this process


def start(path: Path, head: dict[str, object]) -> None:
    """Open this rank's progress file (phase ``init``); ``head``'s keys are in every record."""
    global _fd, _head, _map, _width
    path.parent.mkdir(parents=True, exist_ok=True)
    _fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    _head = json.dumps(head)[1:-1]
    _width = max(WIDTH, len(_head) + 160)  # room for the longest phase, step and times after the head
    os.ftruncate(_fd, _width + 1)
    with contextlib.suppress(OSError, ValueError):  # a filesystem without shared maps: pwrite
        _map = mmap.mmap(_fd, _width + 1)
    _write()


def _write() -> None:
    if _fd is None:
        return
    line = (f'{{{_head}, "phase": "{_phase}", "step": {_step}, "steps": {_steps}, "first_step_at": {_first}, '
            f'"at": {time.time():.3f}}}').ljust(_width).encode() + b"\n"
    if _map is not None and len(line) == _width + 1:
        _map[:] = line
    else:
        os.pwrite(_fd, line, 0)


def phase(name: str, at_step: int | None = None) -> None:
    """Enter a phase (``step``: computing, ``eval``, ``checkpoint``, ``done``)."""
    global _phase, _step
    _phase = name
    if at_step is not None:
        _step = at_step
    _write()


def step(number: int) -> None:
    """Step ``number`` begins: phase ``data`` (waiting for its batch) until :func:`phase` ``("step")``.

    The hot path, one small write. A rank stuck before its step's collectives — in its input pipeline,
    or anywhere between steps — shows an older step or phase than the ranks waiting for it there."""
    global _phase, _step, _steps, _first
    if number != _step:
        _steps += 1
        if _steps == 2:  # the first step of this process is done
            _first = round(time.time(), 3)
    _phase, _step = DATA, number
    _write()


def beat() -> None:
    """Still busy in the current phase (e.g. one more eval batch)."""
    _write()


def trained() -> bool:
    """Whether this process finished at least one step (the launcher restarts only attempts that did)."""
    return _steps > 1 or (_steps == 1 and _phase == DONE)
