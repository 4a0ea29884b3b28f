"""Evaluation on the eval split: each rank scores a shard, the sums are all-reduced."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from workers import contract, progress
from workers.data.loader import loader_kwargs, shard_loader, to_device
from workers.distributed.comm import Comm


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_set: Any, forward_loss: Callable[[Any], tuple[Any, Any, Any]],
             metric_fns: dict[str, Callable[..., Any]], comm: Comm, data: dict[str, Any],
             channels_last: bool) -> dict[str, float]:
    """Loss and metrics (``test/NAME``) over the whole eval split; ``forward_loss(batch)`` gives
    (loss, outputs, targets) as in training."""
    if eval_set is None:
        return {}
    progress.phase(contract.EVAL)
    dev = comm.device
    model.eval()
    names = [*metric_fns, "loss"]  # metrics first: the closing line leads with them
    sums = torch.zeros(2 * len(names), dtype=torch.float64, device=dev)  # (value * n, n) per name
    kw = {k: v for k, v in loader_kwargs(data, dev).items() if k != "persistent_workers"}
    batches = shard_loader(eval_set, comm.rank, comm.world_size, max(256, int(data["batch_size"])), kw)
    for batch in batches:
        loss, outputs, targets = forward_loss(to_device(batch, dev, channels_last))
        n = float(len(targets))
        values = [*(fn(outputs, targets) for fn in metric_fns.values()), loss]
        for i, v in enumerate(values):
            if v is not None:
                sums[2 * i] += float(v) * n
                sums[2 * i + 1] += n
        progress.beat()
    totals = (comm.allreduce_mean(sums) * comm.world_size).tolist()
    model.train()
    progress.phase(contract.STEP)
    return {f"test/{name}": totals[2 * i] / totals[2 * i + 1] for i, name in enumerate(names) if totals[2 * i + 1]}
