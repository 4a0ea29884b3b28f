"""Learning-rate schedules (optimizers are built from `optimizer._target_` in workers/task.py).

The schedule is a pure function of the step (nanoGPT's ``get_lr``), so a checkpoint's step number
is the whole scheduler state and the LR can be checked against its formula in a unit test.
"""

from __future__ import annotations

import math

import torch

from workers.config import ScheduleConfig


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
