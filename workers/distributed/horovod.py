"""Horovod implementation of the trainer's Comm interface (imported only with --comm horovod)."""

from __future__ import annotations

import contextlib
from typing import Any

import horovod.torch as hvd
import torch
from torch import nn

from workers.distributed.comm import pick_device, unscale_clip_step
from workers.distributed.ddp import SingleProcessComm


class HorovodComm(SingleProcessComm):
    name = "horovod"

    def __init__(self) -> None:
        hvd.init()
        # rank/size/local_rank come from Horovod itself, whichever controller started us
        self.rank, self.world_size, self.local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        self.local_world_size = hvd.local_size()
        self.device = pick_device(self.local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       accum_steps: int) -> torch.optim.Optimizer:
        return hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                        backward_passes_per_step=accum_steps, op=hvd.Average)

    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        # A resumed state is broadcast from rank 0. A fresh optimizer is left alone: Horovod would
        # initialise an empty state with a zero-gradient step(), which moves AdamW's weights and
        # shifts Adam's bias correction by one step.
        if optimizer.state:
            hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def no_sync(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        # backward_passes_per_step already delays the allreduce to the last micro-step
        return contextlib.nullcontext()

    def clip_and_step(self, optimizer: torch.optim.Optimizer, model: nn.Module, max_norm: float,
                      want_norm: bool, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor | None:
        optimizer.synchronize()  # finish the allreduce so that clipping sees averaged gradients
        with optimizer.skip_synchronize():
            return unscale_clip_step(optimizer, model, max_norm, want_norm, scaler)

    def allreduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return hvd.allreduce(tensor.detach(), op=hvd.Average)

    def broadcast_object(self, obj: Any) -> Any:
        # an explicit name: Horovod's default is the object's type name, which differs between rank 0
        # (say an int) and the others (None), and ops with different names never meet
        return hvd.broadcast_object(obj, root_rank=0, name="launcher.broadcast_object")

    def allgather_object(self, obj: Any) -> list[Any]:
        return hvd.allgather_object(obj, name="launcher.allgather_object")

    def barrier(self) -> None:
        hvd.barrier()

    def close(self) -> None:
        # ranks that reach shutdown at different times (rank 0 writes the last checkpoint and the
        # hparams) could hang in Horovod's background thread: meet first
        hvd.barrier()
        hvd.shutdown()
