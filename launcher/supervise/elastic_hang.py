"""Horovod Elastic's hang watch (``--backend horovod --fault-tolerant``): a stuck worker is killed alone, and the others
go on.

A thread beside the supervisor reads each slot's newest worker's progress record (``attempts/<N>/rank<S>.progress``,
a link to the worker's own folder, workers/incarnation.py), by slot and pid: Horovod renumbers the ranks after a
reset, a slot keeps its number, and a worker started again on a slot is another pid. When every live worker has
made no progress for longer than its phase's timeout (in data parallelism the others wait for the stuck one in the
next collective), the suspect is a stopped process (SIGSTOP) if there is one, else the one furthest behind. It gets
SIGUSR2 and SIGCONT (faulthandler writes its stack into its own ``rank<S>.stacks``; a stopped process runs the
handler only once continued), then SIGKILL, and the hang is a console line and a ``hang`` record in
``RUN_DIR/events.jsonl``. Horovod Elastic resets: the others go on at the smaller size, and Horovod starts the slot's
worker again after the blacklist cooldown, within the slot's --max-restarts (workers/distributed/elastic.py).
A worker in start-up (phase init: a joining one, or the others while Horovod resets, workers/distributed/elastic.py)
holds no step timeout: the ring waits for it, within the init timeout.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from launcher.plan.types import LaunchPlan
from launcher.supervise.procs import STACKS_WAIT_S, alive, environ_of, signal_pids, stacks_then_kill
from launcher.supervise.supervisor import Supervisor
from launcher.supervise.watch import Rank, Timeouts
from workers import contract, events
from workers.contract import PHASES
from workers.files import read_json

WATCH_EVERY_S = 0.5  # how often the records are read, as the supervisor's watch


class ElasticHangWatch:
    def __init__(self, run_dir: Path, timeouts: Timeouts, attempt: int) -> None:
        self.run_dir, self.timeouts = run_dir, timeouts
        self.folder = contract.attempt_dir(run_dir, attempt)
        self.workers: dict[int, Rank] = {}  # slot -> its newest worker
        self.host = socket.gethostname()
        self.ours = f"{contract.RUN_DIR_ENV}={run_dir}".encode()  # in a worker's environment: a pid of this run

    def poll(self) -> None:
        now = time.monotonic()
        for path in contract.rank_files(self.folder, contract.PROGRESS):
            record = read_json(path)
            if record is None:
                continue  # caught mid-write, or a link to a worker that has not written yet
            known = self.workers.get(record["rank"])
            if known is None or known.pid != record.get("pid"):  # a worker started again on the slot
                self.workers[record["rank"]] = Rank(record["rank"], record, now)
            elif known.record != record:
                known.record, known.seen = record, now

    def live(self) -> list[Rank]:
        """Running workers of this run on this host (a slot's record outlives its worker until the next starts)."""
        return [w for w in self.workers.values() if w.record.get("hostname") == self.host and alive(w.pid)
                and self.ours in environ_of(w.pid)]

    def stuck(self) -> Rank | None:
        """The worker to kill, when every live worker is past its phase's timeout; else None."""
        now, live = time.monotonic(), self.live()
        timed = [w for w in live if self.timeouts.of(w.phase)]
        over = [w for w in timed if now - w.seen > self.timeouts.of(w.phase)]
        if not over or len(over) < len(timed) or any(w.phase == contract.INIT and w not in over for w in live):
            return None  # someone still moves, or a worker in start-up holds the ring (within the init timeout)
        return min(over, key=lambda w: (not w.stopped, w.record.get("step", -1), PHASES.index(w.phase), w.seen))

    def kill(self, worker: Rank) -> None:
        """Its stack, then SIGKILL; the console line and the event. Only this worker is touched."""
        now = time.monotonic()
        stacks = contract.rank_file(self.folder, worker.rank, contract.STACKS).resolve()  # its own, not the link
        before, stopped = _size(stacks), worker.stopped
        stacks_then_kill(lambda sig: signal_pids([worker.pid], sig), lambda: _size(stacks) > before, STACKS_WAIT_S)
        stalled, limit = round(now - worker.seen, 1), self.timeouts.of(worker.phase)
        slot, step = worker.record.get("slot", worker.rank), worker.record.get("step")
        print(f"launcher: horovod elastic: hang: the worker on slot {slot} (pid {worker.pid}) made no progress for "
              f"{stalled:.0f} s in phase {worker.phase} at step {step} (timeout {limit:g} s): killed, the others go "
              f"on; its stack: {stacks}", file=sys.stderr, flush=True)
        events.append(self.run_dir, "hang", step, slot=slot, pid=worker.pid, phase=worker.phase, stalled_s=stalled,
                      timeout_s=limit, stacks=str(stacks), stopped=stopped, by="launcher")
        for other in self.workers.values():  # the survivors reset: each one's timeout starts again
            other.seen = time.monotonic()

    def check(self) -> None:
        self.poll()
        if (worker := self.stuck()) is not None:
            self.kill(worker)


def _size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0


@contextlib.contextmanager
def watching(plan: LaunchPlan, sup: Supervisor) -> Iterator[None]:
    """Under Horovod Elastic on one node, the hang watch in a thread while the block (``sup.run()``) runs; it acts
    only until the launcher stops the job (a signal, or a failure). Elsewhere nothing: the supervisor's own watch."""
    # one node only: across hosts the stuck worker may be on another machine (its records too, on a disk of its
    # own), while the ones here wait for it: killing one of them would kill a healthy worker
    if not (plan.fault_tolerant and plan.backend == "horovod") or plan.hosts:
        yield
        return
    watch, stop = ElasticHangWatch(plan.run_dir, Timeouts(*plan.timeouts), plan.attempt), threading.Event()

    def loop() -> None:
        while not stop.wait(WATCH_EVERY_S):
            if sup.deadline is None and not sup.signals:
                watch.check()

    thread = threading.Thread(target=loop, name="elastic-hang-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=STACKS_WAIT_S + 5)
