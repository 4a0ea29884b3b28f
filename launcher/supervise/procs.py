"""The process table: a process's descendants, signalling the ranks among them, killing a job's groups,
finding a run's processes by its token, asking for a signal when a parent dies.

Read from /proc (Linux), used by the supervisor, the node agent on every host and the reaper.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from workers import contract

GRACE_S = 30.0  # after SIGTERM, how long children get to checkpoint and exit before SIGKILL
GONE_GRACE_S = 3.0  # the same when the launcher is gone (killed): short, so everything ends within 10 s
# every process of a run (runners, ranks, ssh clients, node agents) carries this variable with the run's own value:
# the environment is inherited through runners, shells and sessions, which parent links and process groups are not
TOKEN_VAR = contract.JOB_TOKEN_ENV
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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


STACKS_WAIT_S = 3.0  # how long a hung process gets to write its stack before SIGKILL


def stacks_then_kill(send: Callable[[signal.Signals], None], written: Callable[[], bool], wait_s: float) -> None:
    """A hung process: its stack first (SIGUSR2, faulthandler; SIGCONT, since a stopped process runs the handler
    only once continued), waited for up to ``wait_s`` until ``written()``, then SIGKILL. ``send`` delivers a signal
    (to local pids, or through a remote host's node agent)."""
    send(signal.SIGUSR2)
    send(signal.SIGCONT)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not written():
        time.sleep(0.1)
    send(signal.SIGKILL)


def rank_processes(pid: int, marker: str) -> list[int]:
    """The rank processes under ``pid``, told from runners and shells by ``marker`` in their argv."""
    return [p for p in descendants(pid) if marker in argv_of(p)]


def signal_ranks(pid: int, marker: str, sig: int) -> None:
    signal_pids(rank_processes(pid, marker), sig)


def kill_group(pid: int, sig: int) -> None:
    """``sig`` to the process group ``pid`` leads; SIGKILL also to every descendant, since ranks run in
    sessions of their own and would outlive a killed torchrun."""
    ranks = descendants(pid) if sig == signal.SIGKILL else []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    signal_pids(ranks, sig)


def environ_of(pid: int) -> list[bytes]:
    """The ``KEY=VALUE`` entries ``pid`` started with; [] for a zombie or a process we may not read."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (field 3, the state, first); [] if the process is gone. The name is
    cut off at its closing parenthesis: it may hold spaces and parentheses itself."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def started(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22); None if it is gone."""
    fields = stat_fields(pid)
    return int(fields[19]) if len(fields) > 19 else None


def token_pids(token: str, since: int = 0) -> list[int]:
    """Live processes (not this one) whose environment carries ``TOKEN_VAR=token`` and that started at ``since``
    (clock ticks, see :func:`started`) or later: one run's, on this host. ``since``, the launcher's start, spares
    what is older and carries the same token by no doing of the run: the shell that exported it, say."""
    entry, me = f"{TOKEN_VAR}={token}".encode(), os.getpid()
    return [pid for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
            if pid != me and entry in environ_of(pid) and (started(pid) or 0) >= since]


def parent_death_signal(sig: int) -> Callable[[], None]:
    """A function that makes the kernel send ``sig`` to the calling process when its parent *thread* exits
    (prctl PR_SET_PDEATHSIG; kept across exec): call it first thing, or pass it as a Popen preexec_fn from a
    thread that lives as long as the child should. A no-op where there is no prctl."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in a freshly forked child
    except (OSError, AttributeError):
        return lambda: None
    return lambda: prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0),
                         ctypes.c_ulong(0))
