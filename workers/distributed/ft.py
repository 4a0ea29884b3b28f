"""Comm under torchft (``--fault-tolerant``): each rank is a replica group of its own; a quorum of the live groups
is formed every step, a group that died and came back heals from a live peer's state and rejoins.

torchft's pieces do the work: :class:`torchft.Manager` (quorum, healing through its HTTP checkpoint transport,
commit or discard of each step), its ``DistributedDataParallel`` (gradients averaged over the live groups) and its
``Optimizer`` wrapper (the step is applied only when every participant's all-reduce succeeded; ``zero_grad``,
at a step's start, starts its quorum, which runs in the background while the forward pass does). What this
adds: the trainer's state as the Manager's state dict, "rank 0" that moves with the quorum, and one line plus one
``RUN_DIR/events.jsonl`` record per drop, rejoin, restart and heal.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers import contract, events
from workers.distributed.comm import pick_device, unscale_clip_step
from workers.distributed.ddp import SingleProcessComm
from workers.distributed.env import DistEnv

# Timeouts that fit the lighthouse's 500 ms heartbeat (launcher/backends/torchft.py): a collective with a dead
# peer fails within a second, and the step is retried with the groups that are left.
PG_TIMEOUT_S = 1.0
MANAGER_TIMEOUT_S = 2.0
QUORUM_TIMEOUT_S = 60.0  # a quorum waits this long for the lighthouse (start-up of the other groups included)
CONNECT_TIMEOUT_S = 30.0


def advertised(host: str | None) -> dict[str, Any]:
    """On a hostfile's host (ssh fan-out), the Manager's arguments that make the other hosts reach this group by the
    name the launcher reached it by: its manager server and its checkpoint server for a healing peer (its store is
    MASTER_ADDR, torchrun's --local-addr). torchft advertises ``socket.gethostname()`` otherwise, which need not
    resolve elsewhere. Nothing on one node."""
    if not host:
        return {}
    from torchft.checkpointing.http_transport import HTTPTransport

    class Transport(HTTPTransport):
        def address(self) -> str:
            return super().address().replace(f"//{socket.gethostname()}:", f"//{host}:", 1)

    return {"hostname": host,
            "checkpoint_transport": Transport(timeout=timedelta(seconds=MANAGER_TIMEOUT_S), num_chunks=0)}


class FTComm(SingleProcessComm):
    name = "torchft"
    signal_polls = False  # a group that heals mid-window joins the peers' collectives at a step's start

    def __init__(self, env: DistEnv, environ: Mapping[str, str]) -> None:
        from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL

        self.group = int(environ[contract.REPLICA_GROUP_ENV])
        self.groups = int(environ[contract.NUM_REPLICA_GROUPS_ENV])
        # data is sharded by group (one rank each): rank r of W in the sampler is group r of W
        self.rank, self.world_size, self.local_rank, self.local_world_size = self.group, self.groups, 0, 1
        self.ranks_on_node = self.groups  # the node's cores are shared by every group (torch threads)
        self.device = pick_device(env.local_rank)  # the launcher gave each group its own GPU (CUDA_VISIBLE_DEVICES)
        group_run_dir = environ.get(contract.RUN_DIR_ENV)  # RUN_DIR/groups/G: events.jsonl is the job's
        self.run_dir = contract.run_dir_of_group(Path(group_run_dir)) if group_run_dir else None
        pg_timeout = timedelta(seconds=PG_TIMEOUT_S)
        pg_type = ProcessGroupNCCL if self.device.type == "cuda" else ProcessGroupGloo
        pg = pg_type(timeout=pg_timeout)
        self.manager = Manager(pg=pg, load_state_dict=None, state_dict=None, min_replica_size=1,
                               replica_id=f"group_{self.group}", timeout=timedelta(seconds=MANAGER_TIMEOUT_S),
                               quorum_timeout=timedelta(seconds=QUORUM_TIMEOUT_S),
                               connect_timeout=timedelta(seconds=CONNECT_TIMEOUT_S),
                               **advertised(environ.get(contract.HOST_ENV)))
        self.started = time.monotonic()
        # torchrun's restarts, after the launcher's: a group whose host was lost is a new torchrun (supervisor.py)
        self.attempt = int(environ.get(contract.RESTART_COUNT_ENV) or 0) + int(environ.get(contract.ATTEMPT_ENV) or 0)
        self.participants = 0  # at the last step: a drop or a rejoin is a change of it
        self.step_started = time.monotonic()
        self.last_duration = 0.0  # of the step before: a failure stalls the step it hits and the next one
        self.group_steps_missed = 0  # sum over steps of the groups not in the quorum (the same count in every group)
        if self.attempt:
            self.event("restart", 0, attempt=self.attempt)

    # -- rank 0 moves with the quorum --------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Rank 0 of the lowest-numbered live group. Before the first quorum every group may read the checkpoint
        on disk (a whole-job restart); no group writes anything then."""
        if self.manager._quorum_future is None:
            return True
        return self.manager.participating_rank() == 0

    def writes(self) -> bool:
        """Whether this group writes TensorBoard and checkpoints this step (a gate for the metrics logger)."""
        return self.manager._quorum_future is not None and self.is_main

    # -- the trainer's hooks -----------------------------------------------------------------------------------
    def register(self, state: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None]) -> None:
        """The trainer's state is what a healing group receives from a live peer (``load`` takes it)."""
        def healed(received: dict[str, Any]) -> None:
            load(received)
            self.group_steps_missed = int(received.get("group_steps_missed", 0))  # the job's count, from the peer
            healed_at = int(received["step"])
            if healed_at:  # step 0: torchft's initial weight sync, not a recovery
                self.event("heal", healed_at, time_to_heal_s=round(time.monotonic() - self.started, 3))

        def shared() -> dict[str, Any]:
            return {**state(), "group_steps_missed": self.group_steps_missed}
        self.manager.register_state_dict_fn("trainer", healed, shared)

    def state_dict(self) -> dict[str, int]:
        """For the checkpoint: the Manager's own state and the job's count of group-steps missed."""
        return {**self.manager.state_dict(), "group_steps_missed": self.group_steps_missed}

    def resume_at(self, step: int, saved: dict[str, int] | None = None) -> None:
        """The Manager's step is the trainer's: after a load from disk, every group reports the same step."""
        saved = saved or {}
        self.manager.load_state_dict({"step": step, "batches_committed": int(saved.get("batches_committed", 0))})
        self.group_steps_missed = int(saved.get("group_steps_missed", 0))

    def committed_step(self, step: int) -> int:
        """After an optimizer step: the Manager's count of committed steps (a discarded step is not one; a heal
        jumps to the peers' step). Also notes a change of participants as an event."""
        now = time.monotonic()
        duration, self.step_started = now - self.step_started, now
        stall, self.last_duration = max(duration, self.last_duration), duration
        participants = self.manager.num_participants()
        current = self.manager.current_step()
        self.group_steps_missed += max(0, self.groups - participants)
        # one record per change: from the group that leads this step's quorum
        if self.participants and participants != self.participants and self.manager.participating_rank() == 0:
            kind = "drop" if participants < self.participants else "rejoin"
            self.event(kind, current, participants=participants, stall_s=round(stall, 3))
        self.participants = participants
        return current

    def events(self) -> list[dict[str, Any]]:
        """Every group's records so far (RUN_DIR/events.jsonl)."""
        return events.read(self.run_dir) if self.run_dir is not None else []

    def log_values(self, samples_per_group_step: int) -> dict[str, float]:
        """TensorBoard's view at a log step: the groups in this step's quorum, the samples skipped so far (those
        the missing groups would have trained)."""
        return {"ft/participants": float(self.participants),
                "ft/samples_skipped": float(self.group_steps_missed * samples_per_group_step)}

    def summary(self, samples_per_group_step: int) -> str:
        events = self.events()
        count = {kind: sum(e["kind"] == kind for e in events) for kind in ("restart", "drop", "rejoin", "heal")}
        skipped = self.group_steps_missed * samples_per_group_step
        stalls = [e["stall_s"] for e in events if e["kind"] == "drop"]
        return (f"fault tolerance: {count['restart']} group restart(s), {count['drop']} drop(s), "
                f"{count['rejoin']} rejoin(s), {count['heal']} heal(s); {skipped} sample(s) skipped"
                + (f"; healthy groups stalled at most {max(stalls):.2f} s" if stalls else ""))

    def event(self, kind: str, step: int, **facts: object) -> None:
        """One console line and one RUN_DIR/events.jsonl record."""
        details = ", ".join(f"{k} {v}" for k, v in facts.items())
        print(f"fault tolerance: group {self.group} {kind} at step {step}" + (f" ({details})" if details else ""),
              flush=True)
        if self.run_dir is not None:
            events.append(self.run_dir, kind, step, group=self.group, rank=0, host=socket.gethostname(), **facts)

    # -- Comm ----------------------------------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module) -> nn.Module:
        """torchft's DistributedDataParallel, with a gradient hook that survives a failed all-reduce.

        torchft 0.2.0's own hook asserts on the future of an all-reduce whose wait failed (a peer died mid-step),
        which kills the survivor it is meant to keep going. This one waits the same way and hands the bucket back
        either way: after a failure the Manager has noted the error and discards the step (should_commit)."""
        from torchft.process_group import ProcessGroupDummy

        # like torchft's class: a dummy group soaks up DDP's own start-up collectives, and unused-parameter
        # search keeps the reducer from rebuilding buckets (a recovering group's would differ)
        ddp = nn.parallel.DistributedDataParallel(model, process_group=ProcessGroupDummy(0, 1),
                                                  find_unused_parameters=True)
        ddp.register_comm_hook(self.manager, _allreduce_bucket)
        return ddp

    def wrap_optimizer(self, optimizer, model, accum_steps):  # noqa: ANN001, ANN201
        from torchft import Optimizer

        return Optimizer(self.manager, optimizer)

    def no_sync(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_step else model.no_sync()

    def clip_and_step(self, optimizer: torch.optim.Optimizer, model: nn.Module, max_norm: float,
                      want_norm: bool, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor | None:
        return unscale_clip_step(optimizer, model, max_norm, want_norm, scaler)

    def allreduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over the groups in this step's quorum (a healing group contributes nothing)."""
        tensor = tensor.detach().clone()
        self.manager.allreduce(tensor).wait()
        return tensor

    def averaged_over(self) -> int:
        return self.manager.num_participants()

    def close(self) -> None:
        self.manager.shutdown(wait=False)


def _allreduce_bucket(manager, bucket):  # noqa: ANN001, ANN202 -- DDP checks that annotations, if any, are its own
    """The bucket's all-reduce, left running while the backward pass goes on (DDP waits for it at the end), as
    DDP's own hook does. ``Manager.allreduce`` waits for the quorum, zeroes a healing group's bucket and starts the
    sum; the mean and the error handling are chained here because torchft 0.2.0's lazy chain works only once the
    work is done (its own hook waits for each bucket, which stops the backward pass meanwhile). A failed all-reduce
    (a peer died mid-step) hands the bucket back, and the Manager, told of the error, discards the step."""
    from torchft.manager import _ManagedWork

    buffer = bucket.buffer()
    work = manager.allreduce(buffer)
    if not isinstance(work, _ManagedWork):  # the Manager had already failed this step: nothing was sent
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future(
            devices=[buffer.device] if buffer.is_cuda else None)
        fut.set_result(buffer)
        return fut
    participants = manager.num_participants()

    def mean(summed: torch.futures.Future) -> torch.Tensor:
        summed.value()  # raises if the all-reduce failed
        return buffer.div_(participants)
    return manager.wrap_future(work._work.get_future().then(mean), buffer)
