"""Horovod Elastic (``--backend horovod --fault-tolerant``): when a worker dies the others go on.

horovodrun runs in elastic mode (launcher/backends/horovodrun.py: ``--min-np``/``--max-np`` and a host discovery
script). The trainer's loop runs under ``hvd.elastic.run`` with a ``hvd.elastic.TorchState`` holding the weights,
the optimizer, the step and the data position, committed in memory every ``trainer.elastic_commit_every`` steps.
When a peer fails, the survivors get ``HorovodInternalError``: Horovod rolls the state back to the last commit,
re-forms the ring at the smaller size, and the loop goes on from there with the data re-sharded over the new world
(no sample of the epoch trained twice). A worker that comes back is added at the next commit and gets the state by
broadcast from rank 0. Rank 0 (checkpoints, TensorBoard) is whoever has rank 0 after a reset. Every reset is one
console line and one ``RUN_DIR/events.jsonl`` record, with the survivors' stall (the last step before the failure
to the first one after).

Each host of the discovery listing has its own ``--max-restarts`` (on one node a host is one slot, one rank): Horovod
starts a failed host's workers again after its blacklist cooldown, for ever. After every reset the members agree on
who is in the world (one allgather of the host names, which a joining worker makes too); rank 0 records each host
that left (``failure``) or came back (``rejoin``), counts the failures per host in the state (committed and
broadcast like the step), and takes a host past its budget out of the discovery listing, so Horovod does not start
it again while the others go on. A host of several slots fails as one: Horovod blacklists the whole host when one of
its workers fails and stops the others there, so its failure counts once, and it comes back with all its slots."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import horovod.torch as hvd
from horovod.common.exceptions import HorovodInternalError, HostsUpdatedInterrupt

from workers import contract, events, incarnation, progress
from workers.distributed.comm import pick_device
from workers.distributed.horovod import HorovodComm
from workers.files import write_text
from workers.rank import _is_this_host

Position = tuple[int, dict[str, Any], int]  # (step, data position, step of the newest checkpoint saved)


def local_slots_before(slots: dict[str, int], host: str) -> int:
    """The GPUs taken on this machine by the hosts listed before ``host``. Horovod's local rank counts the workers
    of one host *name*; on one node each rank is a "host" of one slot under another name of this machine
    (launcher/backends/horovodrun.py), so there its GPU is its line's place. Hosts that are other machines (a
    hostfile's) take none: there the GPU is the local rank."""
    names = list(slots)
    earlier = names[:names.index(host)] if host in slots else []
    return sum(slots[name] for name in earlier if _is_this_host(name))


class ElasticComm(HorovodComm):
    elastic = True
    signal_polls = False  # a worker that joins starts with the default poll interval, its peers with theirs

    def __init__(self, commit_every: int, run_dir: Path | None, host: str, max_restarts: int,
                 attempt: int = 0) -> None:
        super().__init__()
        self.host, self.max_restarts = host, max_restarts
        self.attempt = attempt  # the records' attempt folder (the launcher's restarts of horovodrun)
        self.commit_every = max(1, commit_every)
        self.run_dir = run_dir  # events.jsonl's
        slots = incarnation.hosts(run_dir) if run_dir is not None else {}
        if offset := local_slots_before(slots, host):
            self.device = pick_device(offset + self.local_rank)
        self.state: Any = None
        self.get_position: Callable[[], Position] | None = None
        self.set_position: Callable[[int, dict[str, Any], int], None] | None = None
        self.last_step_at = time.monotonic()
        self.reset_at: float | None = None  # a reset happened: the first step after it records the stall
        self.last_step = 0

    def register(self, get_position: Callable[[], Position],
                 set_position: Callable[[int, dict[str, Any], int], None]) -> None:
        self.get_position, self.set_position = get_position, set_position

    def drive(self, loop: Callable[[], dict[str, float]]) -> dict[str, float]:
        assert self.get_position is not None and self.set_position is not None
        step, data, saved = self.get_position()
        # the optimizer is Horovod's DistributedOptimizer: TorchState saves and restores the one it wraps. ``saved``
        # travels with the step: only rank 0 found the checkpoint it resumed from (nothing is collective before the
        # loop), and a rank that skips a save its peers make waits in the save's barrier while they evaluate.
        # members, failures: the hosts in the world at the last reset, each host's failures (see _membership)
        self.state = hvd.elastic.TorchState(model=self.model, optimizer=self.optimizer, step=step, data=data,
                                            saved=saved, members=[], failures={})
        self.state.register_reset_callbacks([self._on_reset])

        @hvd.elastic.run
        def run(state: Any) -> dict[str, float]:
            self._refresh()
            self._membership(state)
            assert self.set_position is not None
            # the committed (or broadcast) position, this world's shard
            self.set_position(state.step, state.data, state.saved)
            try:
                return loop()
            except (HorovodInternalError, HostsUpdatedInterrupt):
                # Horovod resets now: the ring forms again, and waits for a joining worker's start-up (imports
                # included). Start-up's timeout, not the step's, for the launcher's hang watch until the next step.
                progress.phase(contract.INIT)
                raise

        return run(self.state)

    # -- before the loop: nothing collective. A worker that joins a running job starts here while the others are
    # in the loop; the state reaches it by broadcast when hvd.elastic.run syncs (so it does at the first start)
    def allgather_object(self, obj: Any) -> list[Any]:
        return super().allgather_object(obj) if self.state is not None else [obj]

    def broadcast_object(self, obj: Any) -> Any:  # (the checkpoint manager's choice of the file to resume from)
        return super().broadcast_object(obj) if self.state is not None else obj

    def barrier(self) -> None:
        if self.state is not None:
            super().barrier()

    def broadcast_state(self, model: Any, optimizer: Any) -> None:
        pass

    def wrap_model(self, model: Any) -> Any:
        self.model = model
        return super().wrap_model(model)

    def wrap_optimizer(self, optimizer: Any, model: Any, accum_steps: int) -> Any:
        self.optimizer = super().wrap_optimizer(optimizer, model, accum_steps)
        return self.optimizer

    def committed_step(self, step: int) -> int:
        now = time.monotonic()
        if self.reset_at is not None and self.is_main:
            self.event("resumed", step, size=self.world_size, stall_s=round(now - self.last_step_at, 3))
        self.reset_at, self.last_step_at = None, now
        self.last_step = step
        if step % self.commit_every == 0:
            assert self.get_position is not None
            _, self.state.data, self.state.saved = self.get_position()  # the data position after this step
            self.state.step = step  # (the trainer counts the step once this returns)
            # in memory; then raises HostsUpdatedInterrupt if a worker is to be added: all reset, it gets the state
            self.state.commit()
        return step

    def _refresh(self) -> None:
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.local_rank, self.local_world_size = hvd.local_rank(), hvd.local_size()

    def _membership(self, state: Any) -> None:
        """Every member is here after a reset, a joining worker too: one allgather of the host names (a host of N
        slots is named N times); rank 0 records each host that left or came back (the records' ``slot``), and drops
        a host whose failures pass --max-restarts from the listing."""
        now, before = sorted(super().allgather_object(self.host)), state.members
        if before:  # not the first start
            for host in sorted(set(before) - set(now)):
                state.failures = {**state.failures, host: state.failures.get(host, 0) + 1}
                used = state.failures[host] - 1  # Horovod's restarts of this host so far
                if self.is_main:
                    records = [str(path) for path in self._record_departure(host, state.step)]
                    self.event("failure", state.step, slot=host, failures=state.failures[host], records=records)
                if used >= self.max_restarts and self.is_main:
                    self._drop(host)
            for host in sorted(set(now) - set(before)) if self.is_main else []:
                self.event("rejoin", state.step, slot=host)
        if now != before:
            # kept now, not at the next commit: a failure before it rolls back to the state saved last
            state.members = now
            state.save()

    def _record_departure(self, host: str, step: int) -> list[Path]:
        """failure.json of the worker that left, in its own folder (workers/incarnation.py); [] without a run dir."""
        if self.run_dir is None:
            return []
        return incarnation.record_departure(self.run_dir, self.attempt, host, step)

    def _drop(self, host: str) -> None:
        """Out of the discovery listing: Horovod does not start a worker on it again (the others go on)."""
        print(f"horovod elastic: slot {host} failed {self.max_restarts + 1} times, more than --max-restarts "
              f"{self.max_restarts}: not started again; the others go on", flush=True)
        if self.run_dir is not None:  # discovery leaves its line out; the hosts file keeps it (GPUs by line)
            lines = contract.elastic_hosts_file(self.run_dir).read_text().split()
            dropped = contract.elastic_dropped_file(self.run_dir)
            before = dropped.read_text() if dropped.exists() else ""
            write_text(dropped, before + "".join(f"{line}\n" for line in lines if line.rsplit(":", 1)[0] == host))

    def _on_reset(self) -> None:
        self._refresh()
        self.reset_at = time.monotonic()
        if self.is_main:  # the state is back at the last commit: the steps since are trained again
            self.event("reset", self.state.step, size=self.world_size, redo=max(0, self.last_step - self.state.step))

    def event(self, kind: str, step: int, **facts: object) -> None:
        details = ", ".join(f"{k} {v}" for k, v in facts.items())
        print(f"horovod elastic: {kind} at step {step}" + (f" ({details})" if details else ""), flush=True)
        if self.run_dir is not None:
            events.append(self.run_dir, kind, step, rank=self.rank, host=socket.gethostname(), **facts)
