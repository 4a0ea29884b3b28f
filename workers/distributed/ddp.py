"""Comm implementations on torch.distributed: one process, and DistributedDataParallel (NCCL/gloo)."""

from __future__ import annotations

import contextlib
import datetime
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.rendezvous import rendezvous

from workers.config import DDPConfig
from workers.distributed.comm import pick_device, unscale_clip_step
from workers.distributed.env import DistEnv

T = TypeVar("T")


class SingleProcessComm:
    """World size 1: no process group, nothing to synchronise."""

    name = "single"
    # the trainer's own stop/save polls between log steps (workers/sources.py). Off where a rank can start in the
    # middle of a log window and could not know when its peers poll: torchft's heal, Horovod Elastic's join
    signal_polls = True

    def __init__(self, env: DistEnv) -> None:
        self.rank, self.world_size, self.local_rank, self.local_world_size = 0, 1, env.local_rank, 1
        self.device = pick_device(env.local_rank)

    @property
    def is_main(self) -> bool:
        return True

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer, model, accum_steps):  # noqa: ANN001, ANN201
        return optimizer

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """After a (possible) checkpoint load: make every rank hold rank 0's weights and optimizer state.

        DDP ranks all loaded the same file and DDP broadcast the initial weights: nothing to do."""

    def no_sync(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def drive(self, loop: Callable[[], T]) -> T:
        """Run the training loop; Horovod Elastic runs it again after each reset (workers/distributed/elastic.py)."""
        return loop()

    def committed_step(self, step: int) -> int:
        """The step count after an optimizer step: ``step`` itself, except under torchft (workers/distributed/ft.py)."""
        return step

    def clip_and_step(self, optimizer: torch.optim.Optimizer, model: nn.Module, max_norm: float,
                      want_norm: bool, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor | None:
        return unscale_clip_step(optimizer, model, max_norm, want_norm, scaler)

    def allreduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def averaged_over(self) -> int:
        """How many ranks :meth:`allreduce_mean` averages over now: the world size (under torchft, the quorum's)."""
        return self.world_size

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class DDPComm(SingleProcessComm):
    """torch.distributed + DistributedDataParallel: NCCL on GPUs, gloo on CPU."""

    name = "ddp"

    def __init__(self, env: DistEnv, ddp: DDPConfig | None = None, timeout_s: float = 300) -> None:
        self.ddp = ddp or DDPConfig(bucket_cap_mb=25.0, gradient_as_bucket_view=False,
                                            static_graph=False)
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.local_world_size = env.local_world_size
        self.device = pick_device(env.local_rank)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        # env:// reads MASTER_ADDR/PORT, RANK and WORLD_SIZE: the torchrun contract. After a torchrun
        # restart the ranks meet on the same agent store, where the previous attempt's gloo/NCCL
        # addresses are still set: a per-attempt key prefix keeps them from connecting to dead peers.
        store, _, _ = next(rendezvous("env://", env.rank, env.world_size, timeout=timeout))
        store = dist.PrefixStore(f"launcher/attempt_{env.restart_count}", store)
        # device_id binds NCCL's communicator to this rank's GPU at once (eager init); older torch lacks it
        bind = {"device_id": self.device} if self.device.type == "cuda" and "device_id" in inspect.signature(
            dist.init_process_group).parameters else {}
        dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
                                **bind)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_model(self, model: nn.Module) -> nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=self.ddp.bucket_cap_mb,
                                                   gradient_as_bucket_view=self.ddp.gradient_as_bucket_view,
                                                   static_graph=self.ddp.static_graph)

    def no_sync(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        # gradients are all-reduced only on the last micro-step of an accumulation window
        return contextlib.nullcontext() if last_micro_step else model.no_sync()

    def allreduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor / self.world_size

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            # leave together: gloo can abort at exit when a peer tears its connections down mid-call
            with contextlib.suppress(RuntimeError):
                dist.barrier()
            dist.destroy_process_group()
