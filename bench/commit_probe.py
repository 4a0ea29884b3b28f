"""A Horovod Elastic commit against a training step, side by side in one process (bench/elastic_commit_suite.py).

    horovodrun -np 2 -H localhost:2 --gloo python -m bench.commit_probe ROUNDS STEPS

The goodput suites' model and batch (the built-in MLP with model.hidden=1024 on the digits' 64 inputs, Adam, batch
64 per rank, 1 thread per rank) under Horovod's DistributedOptimizer, and a real ``hvd.elastic.TorchState`` holding
what the trainer's holds (workers/distributed/elastic.py: the model, the optimizer, the step, the data position,
the newest checkpoint's step, the membership). Each round times STEPS plain steps, then STEPS steps each followed
by ``state.commit()`` (the commit timed on its own too: ``save()``, the copies of the weights and the optimizer
state, and ``check_host_updates()``, a broadcast to agree on host changes). Rank 0 prints one JSON line of
per-round seconds: ``step_s`` (a plain step), ``commit_s`` (median commit), ``save_s``, ``check_s``,
``commit_in_loop_s`` (a committed step less a plain one) and ``state_bytes`` (weights + optimizer state).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import horovod.torch as hvd
import torch
import torch.nn.functional as F

from workers.models.mlp import MLP

BATCH, INPUTS, HIDDEN, CLASSES = 64, 64, 1024, 10  # bench/goodput_suite.py's MODEL on data=digits


def setup() -> tuple[Callable[[int], None], Any]:
    """(one training step, the TorchState) on this rank."""
    torch.manual_seed(0)
    model = MLP(INPUTS, HIDDEN, CLASSES)
    opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=3e-3),
                                   named_parameters=model.named_parameters(), op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(1 + hvd.rank())
    x, y = torch.randn(1024, INPUTS, generator=g), torch.randint(0, CLASSES, (1024,), generator=g)

    def step(i: int) -> None:
        at = (i * BATCH) % (len(x) - BATCH)
        loss = F.cross_entropy(model(x[at:at + BATCH]), y[at:at + BATCH])
        opt.zero_grad()
        loss.backward()
        opt.step()

    # as the trainer's (ElasticComm.drive): a data position is a few integers
    state = hvd.elastic.TorchState(model=model, optimizer=opt, step=0, data={"epoch": 0, "batch": 0}, saved=0,
                                   members=["localhost", "127.0.0.1"], failures={})
    return step, state


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(rounds: int, steps: int) -> dict[str, object]:
    step, state = setup()
    for i in range(20):  # warm-up: the optimizer's state exists, the allocator has its blocks
        step(i)
    state.commit()
    out: dict[str, list[float]] = {k: [] for k in ("step_s", "commit_s", "save_s", "check_s", "commit_in_loop_s")}
    i = 0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step(i := i + 1)
        plain = (time.perf_counter() - start) / steps
        commits: list[float] = []
        start = time.perf_counter()
        for _ in range(steps):
            step(i := i + 1)
            state.step, state.data = i, {"epoch": 0, "batch": i}
            commits.append(timed(state.commit))
        committed = (time.perf_counter() - start) / steps
        out["step_s"].append(plain)
        out["commit_s"].append(statistics.median(commits))
        out["commit_in_loop_s"].append(committed - plain)
        # the commit's two parts, each on its own (a few times: they are short)
        out["save_s"].append(statistics.median(timed(state.save) for _ in range(5)))
        out["check_s"].append(statistics.median(timed(state.check_host_updates) for _ in range(5)))
    model, opt = state.model, state.optimizer
    tensors = [*model.state_dict().values(), *(t for s in opt.state_dict()["state"].values() for t in s.values()
                                               if isinstance(t, torch.Tensor))]
    return {**out, "state_bytes": sum(t.numel() * t.element_size() for t in tensors), "ranks": hvd.size(),
            "rounds": rounds, "steps_per_round": steps}


if __name__ == "__main__":
    torch.set_num_threads(1)
    hvd.init()
    record = measure(int(sys.argv[1]), int(sys.argv[2]))
    if hvd.rank() == 0:
        print(json.dumps(record), flush=True)
    hvd.barrier()
    hvd.shutdown()
