"""Run a plan's commands: stream their output, forward signals, watch the ranks for hangs and failures."""

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
from typing import TextIO

from launcher.plan.types import Cmd
from launcher.supervise.groups import GroupWatch
from launcher.supervise.procs import (
    GRACE_S,
    STACKS_WAIT_S,
    TOKEN_VAR,
    kill_group,
    rank_processes,
    signal_ranks,
)
from launcher.supervise.reaper import Reaper
from launcher.supervise.respawn import Respawn
from launcher.supervise.watch import Watch, describe

WATCH_EVERY_S = 0.5  # how often the rank records are read
TAIL_LINES = 20  # of the runners' output, for a failure without rank records


def not_restarting(attempt: int) -> str:
    return (f"launcher: attempt {attempt} failed before its first training step: not restarting (a restart would "
            "fail the same way)")


class Supervisor(GroupWatch):
    def __init__(self, commands: list[Cmd], out: TextIO | None = None, watch: Watch | None = None,
                 restarts_left: int = 0, min_nodes: int | None = None,
                 group_watches: dict[int, Watch] | None = None, respawn: Respawn | None = None) -> None:
        # None: the caller's sys.stdout at the time of writing (it may be redirected after import)
        self.commands, self._out, self.watch = commands, out, watch
        self.restarts_left = restarts_left  # that the runner itself makes (torchrun); the launcher's are its own
        self.min_nodes = min_nodes  # elastic: the job survives nodes that fail while this many remain
        self.no_restart = False  # set when an attempt failed before its first step: restarting would not help
        self.ranks_killed_at: float | None = None  # after a hang: the runners get a moment to exit on their own
        self.killed_ranks: set[int] = set()  # the local rank processes killed then
        self.procs: list[subprocess.Popen] = []
        self.output: deque[str] = deque(maxlen=TAIL_LINES)  # shown when no rank left a record (job.py)
        self.failed: list[Cmd] = []  # commands that failed on their own (not stopped by us), in order
        self.signals: list[int] = []
        self.deadline: float | None = None  # set once termination starts; SIGKILL after it
        self._lock = threading.Lock()
        # --fault-tolerant: a watch per replica group (command index -> its records), each group on its own
        self.group_watches = group_watches or {}
        self.pumps: list[threading.Thread] = []
        self.respawn = respawn

    def _pump(self, proc: subprocess.Popen, cmd: Cmd, prefix: str) -> None:
        assert proc.stdout is not None
        label = re.compile(cmd.relabel[0]) if cmd.relabel else None
        for raw in proc.stdout:
            lines = [raw.rstrip("\n")]
            if label is not None:  # the runner's own rank tag -> the same [rankN]: on every backend
                # the runner's stdout and stderr share this pipe, so a tag can also come mid-line: a new line
                lines = label.sub("\n" + cmd.relabel[1], lines[0]).removeprefix("\n").split("\n")
            with self._lock:
                self.output.extend(lines)
                out = self._out or sys.stdout
                out.write("".join(f"{prefix}{line}\n" for line in lines))
                out.flush()

    def signal_ranks(self, sig: signal.Signals) -> None:
        """``sig`` to the rank processes only: torchrun, horovodrun's helpers and the shells it starts ranks
        with would die of SIGUSR1's default action. Remote ranks get it from their node agent."""
        for p, cmd in zip(self.procs, self.commands, strict=False):
            if p.poll() is not None or cmd.service:
                continue
            if cmd.remote:
                self._send(p, f"RANKS {sig.name}")
            else:
                signal_ranks(p.pid, cmd.rank_marker, sig)

    def local_ranks(self) -> set[int]:
        """The rank processes under the runners started here (remote ranks are their node agent's)."""
        return {pid for p, cmd in zip(self.procs, self.commands, strict=False) if cmd.rank_marker and not cmd.remote
                for pid in rank_processes(p.pid, cmd.rank_marker)}

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGUSR1:  # checkpoint-now request (Slurm preemption warning)
            self.signal_ranks(signal.SIGUSR1)
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
        """A word on a remote node's control channel (ssh's stdin, read by launcher.supervise.node)."""
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

    def _start(self, cmd: Cmd) -> subprocess.Popen:
        proc = subprocess.Popen(list(cmd.argv), env={**os.environ, **cmd.env}, text=True, bufsize=1,
                                stdin=subprocess.PIPE if cmd.remote else None,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, errors="replace")
        pump = threading.Thread(target=self._pump, args=(proc, cmd, f"[{cmd.name}] " if len(self.commands) > 1 else ""),
                                daemon=True)
        pump.start()
        self.pumps.append(pump)
        return proc

    def run(self) -> int:
        """Start every command, wait for all; the first failure stops the rest. Returns an exit code."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        # every command carries the run's token: should the launcher die, however, the watchdog stops them all
        token = next((c.env[TOKEN_VAR] for c in self.commands if TOKEN_VAR in c.env), None)
        reaper = Reaper(token, os.environ) if token else None
        try:
            self.procs = [self._start(cmd) for cmd in self.commands]
            code = self._wait()
        finally:
            self._kill_all(signal.SIGKILL)  # nothing of ours outlives the launcher
            for p in self.procs:
                p.wait()
            for pump in self.pumps:
                pump.join(timeout=5)
            if reaper is not None:
                reaper.close()
            for s, handler in old.items():
                signal.signal(s, handler)
        if self.signals:
            return 128 + self.signals[0]
        return code

    def _watch(self) -> None:
        """Read the ranks' records: act on a hang, or on an attempt that failed before its first step."""
        assert self.watch is not None
        ended = self.watch.poll()
        if ended is not None and (failure := self.watch.failures.get(ended)):  # the runner restarted the ranks
            print(describe(failure, hosts=len(self.commands) > 1)
                  + f"\nlauncher: the ranks were restarted (attempt {ended + 1})", file=sys.stderr, flush=True)
        stuck = self.watch.stalled() if self.deadline is None and self.ranks_killed_at is None else []
        if stuck:
            print(self.watch.report_hang(stuck), file=sys.stderr, flush=True)
            self.signal_ranks(signal.SIGUSR2)  # faulthandler: every thread's stack into attempts/N/rank<R>.stacks
            deadline = time.monotonic() + STACKS_WAIT_S
            while time.monotonic() < deadline and not self.watch.stacks_written():
                time.sleep(0.1)
            # hung ranks cannot checkpoint: kill them; the runner restarts them (torchrun, --max-restarts) or ends
            self.killed_ranks = self.local_ranks()
            self.signal_ranks(signal.SIGKILL)
            self.ranks_killed_at = time.monotonic()
            return
        if self.no_restart or self.watch.attempt >= self.restarts_left:
            return  # no restart of the runner's own left to stop: the failure record need not be read each poll
        failure = self.watch.failure()
        if failure is not None and not failure.first_step_reached:
            self.no_restart = True
            print(not_restarting(self.watch.attempt), file=sys.stderr, flush=True)
            self._kill_all(signal.SIGKILL)

    def elastic_ok(self, codes: list[int | None]) -> bool:
        """Elastic (--nodes MIN:MAX): enough nodes are still running, or finished well, for the job to go on."""
        return self.min_nodes is not None and sum(c in (None, 0) for c in codes) >= self.min_nodes

    def _wait(self) -> int:
        next_watch = 0.0
        while True:
            if self.watch is not None and time.monotonic() >= next_watch:
                self._watch()
                next_watch = time.monotonic() + WATCH_EVERY_S
            if self.group_watches and time.monotonic() >= next_watch:
                self._watch_groups()
                next_watch = time.monotonic() + WATCH_EVERY_S
            if self.ranks_killed_at is not None and (self.local_ranks() - self.killed_ranks or (
                    self.watch is not None and self.watch.hang is None)):
                # the runner restarted the ranks (new rank processes; or a new attempt is being watched): their
                # imports may take long on a slow filesystem, and the hang watch covers them from here
                self.ranks_killed_at = None
            if self.ranks_killed_at is not None and time.monotonic() > self.ranks_killed_at + 10:
                self._kill_all(signal.SIGKILL)  # a runner that does not notice its ranks are gone
            if self.respawn is not None and self.deadline is None:
                self._respawn()
            due = self.respawn.due if self.respawn is not None else {}
            # services (the lighthouse) serve the others: the job is the rest, and a service that ends early fails it;
            # a group due to start again is still part of it
            work = [(cmd, None if i in due else p.poll())
                    for i, (cmd, p) in enumerate(zip(self.commands, self.procs, strict=True)) if not cmd.service]
            codes = [c for _, c in work]
            failed = [c for c in codes if c not in (None, 0)]
            service_died = [cmd for cmd, p in zip(self.commands, self.procs, strict=True)
                            if cmd.service and p.poll() is not None]
            if service_died and self.deadline is None and not all(c is not None for c in codes):
                print(f"launcher: {service_died[0].name} exited while the job ran: stopping it", file=sys.stderr,
                      flush=True)
                self.failed.append(service_died[0])
                self._terminate()
            if self.deadline is None:  # failures before we stopped anything are the job's own
                left = [cmd for cmd, c in work if c not in (None, 0) and cmd not in self.failed]
                self.failed += left
                for cmd in left if self.elastic_ok(codes) else []:
                    kind = "group" if cmd.name.startswith("group") else "node"
                    print(f"launcher: {kind} {cmd.name} left the job; the other {kind}s go on without it",
                          file=sys.stderr, flush=True)
            if all(c is not None for c in codes):
                if service_died and self.failed and self.failed[0].service:
                    return 1
                return 0 if failed and self.elastic_ok(codes) else (failed[0] if failed else 0)
            if failed and not self.elastic_ok(codes):
                self._terminate()  # one node failed: stop the others
            if self.deadline is not None and time.monotonic() > self.deadline:
                self._kill_all(signal.SIGKILL)
            time.sleep(0.1)
