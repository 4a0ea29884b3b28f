"""Start-up: build the user's task on every rank, with one collective for the errors and every rank's facts."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workers import rank, task
from workers.config import Config
from workers.data.loader import TrainLoader, loader_kwargs
from workers.distributed.comm import Comm


@dataclass
class Built:
    """What the config's ``_target_`` nodes build (workers/task.py), placed on this rank's device."""

    net: torch.nn.Module  # the bare module: state dicts come from it
    loader: TrainLoader  # this rank's shard of the training set, resumable
    eval_set: Any
    loss_fn: Callable[..., torch.Tensor]
    metric_fns: dict[str, Callable[..., Any]]
    optimizer: torch.optim.Optimizer


def threads_and_seeds(cfg: Config, comm: Comm) -> None:
    """Intra-op threads: the node's cores shared by its ranks; the same seed on every rank for the same initial
    weights (each rank is re-seeded apart before training: Trainer.prepare)."""
    ranks_here = getattr(comm, "ranks_on_node", comm.local_world_size)  # torchft: every group on this node
    torch.set_num_threads(cfg.trainer.threads or max(1, (os.cpu_count() or 1) // ranks_here))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)


def build(cfg: Config, comm: Comm, channels_last: bool) -> Built:
    dev = comm.device
    model = task.build_model(cfg).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train, evaluation = task.build_data(cfg)
    loader = TrainLoader(train, int(cfg.data["batch_size"]), comm.world_size, comm.rank, cfg.seed, dev,
                         loader_kwargs(cfg.data, dev), channels_last)
    optimizer = task.build_optimizer(cfg, model, comm.world_size, dev.type)
    return Built(model, loader, evaluation, task.build_loss(cfg), task.build_metrics(cfg), optimizer)


def build_once(comm: Comm, build: Callable[[], Any], facts: Any = None) -> tuple[Any, list[Any]]:
    """Build on every rank; if it raises anywhere, the lowest failing rank prints the traceback (once, not
    once per rank) and all ranks exit 1. ``facts`` (this rank's pre-flight description) travel in the same
    gather, so start-up pays one collective for both: returns (what was built, every rank's facts)."""
    try:
        built, error, exc = build(), None, None
    except Exception as e:
        built, error, exc = None, traceback.format_exc(), e
    gathered = comm.allgather_object((error, facts))
    errors = [e for e, _ in gathered]
    failed = [r for r, e in enumerate(errors) if e]
    if failed:
        if comm.rank == failed[0]:
            print(f"building the task failed on rank(s) {failed}:\n{error}", file=sys.stderr, flush=True)
            rank.record_error(exc)  # the launcher's failure report shows it (failure.json)
        else:  # let the reporting rank be the first to exit: the launcher names the first failure
            time.sleep(3)
        raise SystemExit(1)
    return built, [f for _, f in gathered]


def mixed_precision(precision: str, device: torch.device, is_main: bool) -> tuple[Any, Any]:
    """(the forward pass's autocast context, the fp16 GradScaler or None) for ``trainer.precision``."""
    cuda = device.type == "cuda"
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if amp and not cuda and is_main:
        print(f"trainer.precision={precision} applies on CUDA only; training in fp32 on the CPU", flush=True)
    autocast = torch.autocast("cuda", dtype=amp) if amp and cuda else contextlib.nullcontext()
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
    return autocast, torch.amp.GradScaler("cuda") if precision == "fp16" and cuda else None
