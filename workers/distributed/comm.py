"""The trainer's one communication interface, and what its implementations share.

The training loop only calls :class:`Comm` methods; it never names DDP or Horovod. The
implementations live apart (``ddp.py``: single process and DDP; ``horovod.py``), and
:func:`workers.distributed.build_comm` picks one, importing ``horovod`` only when asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn


def pick_device(local_rank: int) -> torch.device:
    """One GPU per rank (LOCAL_RANK) when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


class Comm(Protocol):
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    name: str
    signal_polls: bool  # stop/save polls between log steps (workers/sources.py)

    @property
    def is_main(self) -> bool: ...
    def wrap_model(self, model: nn.Module) -> nn.Module: ...
    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       accum_steps: int) -> torch.optim.Optimizer: ...
    def broadcast_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None: ...
    def no_sync(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager: ...
    def drive(self, loop: Callable[[], dict[str, float]]) -> dict[str, float]: ...
    def committed_step(self, step: int) -> int: ...
    def clip_and_step(self, optimizer: torch.optim.Optimizer, model: nn.Module, max_norm: float,
                      want_norm: bool, scaler: torch.amp.GradScaler | None = None) -> torch.Tensor | None: ...
    def allreduce_mean(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def averaged_over(self) -> int: ...
    def broadcast_object(self, obj: Any) -> Any: ...
    def allgather_object(self, obj: Any) -> list[Any]: ...
    def barrier(self) -> None: ...
    def close(self) -> None: ...


def clip_grads(model: nn.Module, max_norm: float, want_norm: bool) -> torch.Tensor | None:
    """Clip to max_norm if > 0; the global grad norm (left on the device: reading it would sync) when
    clipping computed it anyway or the caller wants it, else None."""
    if max_norm <= 0 and not want_norm:  # the common step between log steps: nothing to compute
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return nn.utils.clip_grad_norm_(params, max_norm)
    if want_norm:
        return torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params]))
    return None


def unscale_clip_step(optimizer: torch.optim.Optimizer, model: nn.Module, max_norm: float, want_norm: bool,
                      scaler: torch.amp.GradScaler | None) -> torch.Tensor | None:
    """Clip (the true gradients: unscaled first under fp16) and step; a GradScaler skips a step with inf/NaN."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = clip_grads(model, max_norm, want_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return norm


def agree(comm: Comm, loss_sum: torch.Tensor, *parts: list[float]) -> tuple[float, list[list[float]]]:
    """A log step's one all-reduce: (the loss averaged over the ranks, each part's values summed over them).
    What rides along: the source's (batch mode's stop/save requests, online mode's prequential sums) and
    the straggler detector's (every rank's local step time)."""
    buffer = torch.tensor([0.0, *(v for part in parts for v in part)], dtype=torch.float64, device=comm.device)
    buffer[0] = loss_sum
    mean = comm.allreduce_mean(buffer).tolist()  # .tolist() syncs with the device
    ranks = comm.averaged_over()
    sums, start = [], 1
    for part in parts:
        sums.append([v * ranks for v in mean[start : start + len(part)]])
        start += len(part)
    return mean[0], sums
