"""The process table: a process's descendants, signalling the ranks among them, killing a job's groups.

Read from /proc (Linux), used by the supervisor and by the node agent on every host.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

GRACE_S = 30.0  # after SIGTERM, how long children get to checkpoint and exit before SIGKILL


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; torchrun starts each rank in a session of its own)."""
    out = []
    # every thread's list: horovodrun starts ranks from worker threads, not its main thread
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def descendants(pid: int) -> list[int]:
    out, todo = [], children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo += children(child)
    return out


def argv_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def signal_ranks(pid: int, marker: str, sig: int) -> None:
    """Signal the rank processes under ``pid``, told from runners and shells by ``marker`` in their argv."""
    signal_pids([p for p in descendants(pid) if marker in argv_of(p)], sig)


def kill_group(pid: int, sig: int) -> None:
    """``sig`` to the process group ``pid`` leads; SIGKILL also to every descendant, since ranks run in
    sessions of their own and would outlive a killed torchrun."""
    ranks = descendants(pid) if sig == signal.SIGKILL else []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    signal_pids(ranks, sig)
