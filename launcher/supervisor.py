"""Run a plan's commands: stream their output, forward signals, report which rank failed and why."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from launcher.commands import Cmd
from launcher.procs import GRACE_S, kill_group, signal_ranks

TAIL_LINES = 50

# torchrun's failure report (torch.distributed.elastic ChildFailedError) names the root cause so:
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")
_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
# ... OpenMPI's mpirun so ("Process name: [[4711,1],1]" then "Exit code: 1"), horovodrun's gloo
# controller so ("Process name: 1" then "Exit code: 1")
_MPI_RANK = re.compile(r"Process name:\s*(?:\[\[\d+,\d+\],)?(\d+)\]?\s*$")
_MPI_EXIT = re.compile(r"Exit code:\s*(-?\d+)")


@dataclass
class Failure:
    rank: int | None
    exit_code: int
    log: Path | None = None
    tail: list[str] = field(default_factory=list)
    node: str | None = None  # the command (host) it ran under, when there are several

    def describe(self) -> str:
        how = (f"killed by signal {signal.Signals(-self.exit_code).name}" if self.exit_code < 0
               else f"exit code {self.exit_code}")
        who = (f"rank {self.rank}" if self.rank is not None else "a rank") + (f" on {self.node}" if self.node else "")
        lines = [f"launcher: {who} failed ({how})" + (f"; log: {self.log}" if self.log else "")]
        if self.tail:
            lines.append(f"---- last {len(self.tail)} lines of {'its log' if self.log else 'output'} ----")
            lines += self.tail
        return "\n".join(lines)


def find_failure(output: list[str], log_dir: Path) -> Failure | None:
    """The first failed rank as torchrun reported it, with the tail of its own log file."""
    rank = local_rank = code = None
    for i, line in enumerate(output):
        if "Root Cause" in line:
            for follow in output[i:]:
                if rank is None and (m := _RANK.match(follow)):
                    rank, local_rank = int(m.group(1)), int(m.group(2))
                elif rank is not None and (m := _EXIT.match(follow)):
                    code = int(m.group(1))
                    break
            break
    if rank is None:
        return _find_mpi_failure(output, log_dir)
    if code is None:
        return None
    return _with_log(rank, code, list(log_dir.glob(f"*/attempt_*/{local_rank}/stderr.log")))


def _with_log(rank: int, code: int, logs: list[Path]) -> Failure:
    """The failure with the tail of the newest of the rank's log files (a restart writes a new one)."""
    log = max(logs, key=lambda p: p.stat().st_mtime, default=None)
    tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log else []
    return Failure(rank, code, log, tail)


def _find_mpi_failure(output: list[str], log_dir: Path) -> Failure | None:
    rank = code = None
    for line in output:
        if rank is None and (m := _MPI_RANK.search(line)):
            rank = int(m.group(1))
        elif rank is not None and (m := _MPI_EXIT.search(line)):
            code = int(m.group(1))
            break
    if rank is None or code is None:
        return None
    return _with_log(rank, code, [*log_dir.glob(f"mpi/*/rank.{rank}/stderr"),
                                  *log_dir.glob(f"horovod/rank.{rank}/stderr")])


class Supervisor:
    def __init__(self, commands: list[Cmd], out: TextIO | None = None) -> None:
        # None: the caller's sys.stdout at the time of writing (it may be redirected after import)
        self.commands, self._out = commands, out
        self.procs: list[subprocess.Popen] = []
        self.output: deque[str] = deque(maxlen=2000)  # enough to hold torchrun's failure report
        self.outputs = {c.name: deque[str](maxlen=2000) for c in commands}  # the same, per command
        self.failed: list[Cmd] = []  # commands that failed on their own (not stopped by us), in order
        self.signals: list[int] = []
        self.deadline: float | None = None  # set once termination starts; SIGKILL after it
        self._lock = threading.Lock()

    def _pump(self, proc: subprocess.Popen, cmd: Cmd, prefix: str) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            with self._lock:
                self.output.append(line)
                self.outputs[cmd.name].append(line)
                out = self._out or sys.stdout
                out.write(f"{prefix}{line}\n")
                out.flush()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGUSR1:
            # checkpoint-now request (Slurm preemption warning): only the ranks may get it; torchrun,
            # horovodrun's helpers and the shells it starts ranks with would die of its default action
            for p, cmd in zip(self.procs, self.commands, strict=False):
                if cmd.remote:
                    self._send(p, "USR1")
                else:
                    signal_ranks(p.pid, cmd.rank_marker, signum)
            return
        if self.procs and all(p.poll() is not None for p in self.procs):
            return  # everything already ended (e.g. docker-compose stopping a finished node): not a stop
        self.signals.append(signum)
        # first signal: ask every child to stop (they checkpoint and exit); second: kill now
        if len(self.signals) > 1:
            self._kill_all(signal.SIGKILL)
        else:
            self._terminate()

    def _terminate(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + GRACE_S
            self._kill_all(signal.SIGTERM)

    @staticmethod
    def _send(proc: subprocess.Popen, word: str) -> None:
        """A word on a remote node's control channel (ssh's stdin, read by launcher.node)."""
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.write(word + "\n")
            proc.stdin.flush()

    def _kill_all(self, sig: int) -> None:
        for p, cmd in zip(self.procs, self.commands, strict=False):
            if p.poll() is None and cmd.remote:
                self._send(p, "KILL" if sig == signal.SIGKILL else "TERM")
                if sig != signal.SIGKILL:
                    continue
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)  # the node agent kills its ranks and exits, and ssh with it
            if p.poll() is None:
                kill_group(p.pid, sig)

    def run(self) -> int:
        """Start every command, wait for all; the first failure stops the rest. Returns an exit code."""
        multi = len(self.commands) > 1
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        pumps = []
        try:
            for cmd in self.commands:
                proc = subprocess.Popen(list(cmd.argv), env={**os.environ, **cmd.env}, text=True, bufsize=1,
                                        stdin=subprocess.PIPE if cmd.remote else None,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True, errors="replace")
                self.procs.append(proc)
                pump = threading.Thread(target=self._pump, args=(proc, cmd, f"[{cmd.name}] " if multi else ""),
                                        daemon=True)
                pump.start()
                pumps.append(pump)
            code = self._wait()
        finally:
            self._kill_all(signal.SIGKILL)  # nothing of ours outlives the launcher
            for p in self.procs:
                p.wait()
            for pump in pumps:
                pump.join(timeout=5)
            for s, handler in old.items():
                signal.signal(s, handler)
        if self.signals:
            return 128 + self.signals[0]
        return code

    def _wait(self) -> int:
        while True:
            codes = [p.poll() for p in self.procs]
            failed = [c for c in codes if c not in (None, 0)]
            if self.deadline is None:  # failures before we stopped anything are the job's own
                self.failed += [cmd for cmd, c in zip(self.commands, codes, strict=True)
                                if c not in (None, 0) and cmd not in self.failed]
            if all(c is not None for c in codes):
                return failed[0] if failed else 0
            if failed:
                self._terminate()  # one node failed: stop the others
            if self.deadline is not None and time.monotonic() > self.deadline:
                self._kill_all(signal.SIGKILL)
            time.sleep(0.1)
