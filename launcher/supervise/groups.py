"""``--fault-tolerant`` (torchft) in the supervisor: each replica group is watched on its own, a hung one killed alone
(its torchrun restarts it), and across hosts a group whose host was lost is started there again (respawn.py).
The other groups never stop."""

from __future__ import annotations

import functools
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from launcher.plan.types import Cmd
from launcher.supervise.procs import STACKS_WAIT_S, rank_processes, signal_pids, stacks_then_kill
from launcher.supervise.respawn import Respawn
from launcher.supervise.watch import Watch, describe
from workers import contract, events


def group_event(cmd: Cmd, kind: str, step: object, **facts: object) -> None:
    """The launcher's record of a replica group's failure or hang in RUN_DIR/events.jsonl, beside the ranks' own
    (workers/distributed/ft.py)."""
    run_dir = contract.run_dir_of_group(Path(cmd.env[contract.RUN_DIR_ENV]))
    events.append(run_dir, kind, step, group=int(cmd.env[contract.REPLICA_GROUP_ENV]), rank=0, by="launcher",
                  **facts)


class GroupWatch:
    """The Supervisor's part for replica groups (a mix-in: it runs on the Supervisor's commands and processes)."""

    commands: list[Cmd]
    procs: list[subprocess.Popen]
    group_watches: dict[int, Watch]  # command index -> its group's records
    respawn: Respawn | None
    deadline: float | None  # set once the job stops: hangs are not acted on then
    _start: Callable[[Cmd], subprocess.Popen]  # starts a command with its output pump
    _send: Callable[[subprocess.Popen, str], None]  # a word to a node agent (launcher/supervise/node.py)

    def _watch_groups(self) -> None:
        """Fault tolerant: a group's failure is reported as its torchrun restarts it; a hung group (its rank
        stopped, or stuck in a collective) gets its stack dumped and is killed, so its torchrun restarts it
        alone, while torchft's quorum has already dropped it and the other groups go on."""
        for index, watch in self.group_watches.items():
            cmd, proc = self.commands[index], self.procs[index]
            ended = watch.poll()
            if ended is not None and (failure := watch.failures.get(ended)):
                print(describe(failure, hosts=False) + f"\nlauncher: {cmd.name} restarts alone (attempt {ended + 1}); "
                      "the other groups go on", file=sys.stderr, flush=True)
                group_event(cmd, "failure", failure.step, attempt=ended, reason=failure.reason,
                            exit_code=failure.exit_code, signal=failure.signal)
            stuck = watch.stalled() if self.deadline is None and proc.poll() is None else []
            if not stuck:
                continue
            print(watch.report_hang(stuck).replace("launcher: hang:", f"launcher: {cmd.name} hung:", 1),
                  file=sys.stderr, flush=True)
            assert watch.hang is not None
            group_event(cmd, "hang", watch.hang.step, attempt=watch.attempt, phase=watch.hang.phase,
                        stalled_s=watch.hang.stalled_s, stacks=watch.hang.stacks)
            # the stack into the group's attempts/N/rank0.stacks; killed, its torchrun restarts it (its own budget)
            stacks_then_kill(functools.partial(self._signal_group, index), watch.stacks_written, STACKS_WAIT_S)

    def _signal_group(self, index: int, sig: signal.Signals) -> None:
        """``sig`` to a replica group's rank: a remote group's from its node agent."""
        cmd, proc = self.commands[index], self.procs[index]
        if cmd.remote:
            self._send(proc, f"RANKS {sig.name}")
        else:
            signal_pids(rank_processes(proc.pid, cmd.rank_marker), sig)

    def _respawn(self) -> None:
        """Fault tolerant across hosts: a group whose host was lost is started there again (respawn.py)."""
        assert self.respawn is not None
        for i, (cmd, proc) in enumerate(zip(self.commands, self.procs, strict=True)):
            if cmd.service or proc.poll() is None or not (then := self.respawn.lost(i, proc.returncode)):
                continue
            watch = self.group_watches.get(i)
            step = max((r.record.get("step", 0) for r in watch.ranks.values()), default=0) if watch else 0
            host = cmd.env.get(contract.HOST_ENV, "?")
            print(f"launcher: {cmd.name} lost its host {host} (ssh exited {proc.returncode}): {then}",
                  file=sys.stderr, flush=True)
            group_event(cmd, "failure", step, attempt=watch.attempt if watch else 0, reason="host lost", host=host)
        for i in self.respawn.ready():
            watch = self.group_watches.get(i)
            self.commands[i] = self.respawn.build(i, watch.attempt + 1 if watch else 0)
            self.procs[i] = self._start(self.commands[i])
