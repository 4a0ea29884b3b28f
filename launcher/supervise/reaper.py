"""Watchdog: however the launcher ends — SIGKILL, the OOM killer, a crash — no process of its run outlives it.

    python -m launcher.supervise.reaper TOKEN SINCE        (stdin: a pipe only the launcher writes to)

The supervisor starts it before any command, in a session of its own (a Ctrl-C or a kill of the launcher's
process group does not reach it), and keeps the pipe's write end. ``done`` on the pipe: the launcher stopped its
run itself; exit at once. End of input without it: the launcher is gone. Then every process whose environment
carries ``LAUNCHER_JOB_TOKEN=TOKEN`` (runners, ranks, ssh clients, node agents on this host) and started no
earlier than the launcher (SINCE, in clock ticks since boot: the shell that exported a token is older) gets
SIGTERM, what is left after GONE_GRACE_S gets SIGKILL, and the table is scanned again until none is left (a
runner may start ranks meanwhile) or GIVE_UP_S have passed. Processes without the token are never touched.
Remote hosts are their node agents' to clean up: the ssh client's end closes their input.

It imports no torch and starts in tens of milliseconds; it does not carry the token itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

from launcher import resources
from launcher.supervise.procs import GONE_GRACE_S, TOKEN_VAR, signal_pids, started, token_pids

GIVE_UP_S = GONE_GRACE_S + 5.0  # bounded: a process stuck in the kernel (D state) survives even SIGKILL
SCAN_EVERY_S = 0.1


class Reaper:
    """The launcher's side: the watchdog process and the write end of its pipe."""

    def __init__(self, token: str, env: Mapping[str, str]) -> None:
        read, self._write = os.pipe()  # neither end is inherited by the commands the supervisor starts later
        path = resources.pythonpath(env)  # the ranks' import path: `-m launcher.supervise.reaper` from any directory
        child_env = {k: v for k, v in env.items() if k != TOKEN_VAR} | ({"PYTHONPATH": path} if path else {})
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "launcher.supervise.reaper", token,
                                          str(started(os.getpid()) or 0)], stdin=read,
                                         stdout=subprocess.DEVNULL, env=child_env, start_new_session=True)
        finally:
            os.close(read)

    def close(self) -> None:
        """The run is over and its processes are stopped: the watchdog exits without scanning."""
        with contextlib.suppress(OSError):
            os.write(self._write, b"done\n")
        os.close(self._write)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def reap(token: str, since: int = 0, grace_s: float = GONE_GRACE_S, give_up_s: float = GIVE_UP_S) -> int:
    """SIGTERM every process carrying ``token`` (started at ``since`` or later), SIGKILL the rest after ``grace_s``;
    returns how many there were."""
    start, seen = time.monotonic(), set[int]()
    while (pids := token_pids(token, since)) and (elapsed := time.monotonic() - start) < give_up_s:
        if elapsed < grace_s:
            signal_pids([p for p in pids if p not in seen], signal.SIGTERM)  # once each: a second may cut a save
        else:
            signal_pids(pids, signal.SIGKILL)
        seen.update(pids)
        time.sleep(SCAN_EVERY_S)
    return len(seen)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0] or not argv[1].isdigit():
        sys.exit("usage: python -m launcher.supervise.reaper TOKEN SINCE   (stdin: the launcher's pipe)")
    token, since = argv[0], int(argv[1])
    for sig in (signal.SIGINT, signal.SIGHUP):  # a terminal's signals are for the launcher, not its watchdog
        signal.signal(sig, signal.SIG_IGN)
    launcher = os.getppid()
    if sys.stdin.buffer.read().strip() == b"done":  # blocks until the launcher closes the pipe, or dies
        return 0
    stopped = reap(token, since)
    if stopped:
        with contextlib.suppress(OSError):  # the launcher's stderr may be gone with it
            print(f"launcher: the launcher (pid {launcher}) is gone: stopped {stopped} process(es) of its run",
                  file=sys.stderr, flush=True)
    return 1 if token_pids(token, since) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
