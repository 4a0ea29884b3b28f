"""Optimizers and learning-rate schedules.

The schedule is a pure function of the step (nanoGPT's ``get_lr``), so a checkpoint's step number
is the whole scheduler state and the LR can be checked against its formula in a unit test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from workers.config import OptimizerConfig, ScheduleConfig


def peak_lr(opt: OptimizerConfig, world_size: int) -> float:
    # The linear scaling rule is opt-in: silently changing the LR with the world size surprises people.
    return opt.lr * world_size if opt.scale_lr_with_world_size else opt.lr


def lr_at(step: int, peak: float, sched: ScheduleConfig, max_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based)."""
    if step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    if sched.name == "constant":
        return peak
    if sched.name == "step":
        return peak * sched.gamma ** (step // sched.step_size)
    total = sched.total_steps or max_steps
    span = max(1, total - sched.warmup_steps)
    progress = min(1.0, (step - sched.warmup_steps) / span)
    if sched.name == "linear":
        return sched.min_lr + (peak - sched.min_lr) * (1.0 - progress)
    return sched.min_lr + 0.5 * (peak - sched.min_lr) * (1.0 + math.cos(math.pi * progress))  # cosine


def build_optimizer(opt: OptimizerConfig, params: Iterable[torch.nn.Parameter],
                    world_size: int) -> torch.optim.Optimizer:
    lr = peak_lr(opt, world_size)
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov,
                               weight_decay=opt.weight_decay)
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)  # type: ignore[arg-type]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
