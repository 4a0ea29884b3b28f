"""The bare baselines: a minimal hand-written DDP loop, started by bare torchrun or bare mpirun.

    torchrun --standalone --nproc-per-node 2 bench/minimal_ddp.py STEPS INTERVAL BATCH
    mpirun -np 2 python bench/minimal_ddp.py STEPS INTERVAL BATCH     # rank and port from mpi4py

Same model (64 -> 128 -> 10 MLP), optimizer (Adam), per-rank batch and synthetic data as
``python -m launcher data=synthetic``, and the trainer's measurement: samples/s over each interval of
steps, seen by rank 0. Prints one JSON line from rank 0:
{"samples_per_s": median over intervals after the first, "first_step_time": wall clock}.
bench/minimal_horovod.py runs the same loop with Horovod's DistributedOptimizer.
"""

import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def data(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, labels, this rank's sample order)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8192, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
    return x, y, torch.randperm(len(x), generator=g)[rank::world]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor,
             batch: int, step: int) -> None:
    """One minimal step (bench overhead also interleaves these with the trainer's: bench/rank_hooks.py)."""
    idx = order[(step * batch) % (len(order) - batch):][:batch]
    loss = F.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()  # set_to_none by default; Horovod's optimizer takes no argument
    loss.backward()
    opt.step()


def train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, world: int) -> None:
    """The loop and its measurement; rank 0 prints the JSON line."""
    steps, interval, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    x, y, order = data(rank, world)
    rates, first, tick = [], None, time.perf_counter()
    for step in range(1, steps + 1):
        one_step(model, opt, x, y, order, batch, step)
        if first is None:
            first = time.time()
        if step % interval == 0:
            now = time.perf_counter()
            rates.append(interval * batch * world / (now - tick))
            tick = now
    if rank == 0:
        print(json.dumps({"samples_per_s": statistics.median(rates[1:]), "first_step_time": first}), flush=True)


def mpi_bootstrap() -> None:
    """Under mpirun there is no RANK: take it from MPI, and a port that rank 0 found free."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    else:
        port = None
    os.environ.update(RANK=str(world.Get_rank()), WORLD_SIZE=str(world.Get_size()), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(world.bcast(port, root=0)))


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "RANK" not in os.environ:
        mpi_bootstrap()
    dist.init_process_group("gloo")
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    train(nn.parallel.DistributedDataParallel(model), opt, dist.get_rank(), dist.get_world_size())
    dist.barrier()  # leave together: gloo can abort at exit when a peer is already gone
    dist.destroy_process_group()
