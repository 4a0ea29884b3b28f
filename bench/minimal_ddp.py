"""The baseline for the overhead suite: a minimal hand-written DDP loop, started by bare torchrun.

Same model (64 -> 128 -> 10 MLP), optimizer (Adam), per-rank batch and synthetic data as
``python -m launcher data=synthetic``; prints one JSON line from rank 0:
{"samples_per_s": median over intervals after the first, "first_step_time": wall clock}.
"""

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

steps, interval, batch = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(1)
x = torch.randn(8192, 64, generator=g)
y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)))
opt = torch.optim.Adam(model.parameters(), lr=3e-3)
order = torch.randperm(len(x), generator=g)[rank::world]
rates, first, tick = [], None, time.perf_counter()
for step in range(1, steps + 1):
    idx = order[(step * batch) % (len(order) - batch):][:batch]
    loss = F.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if first is None:
        first = time.time()
    if step % interval == 0:
        now = time.perf_counter()
        rates.append(interval * batch * world / (now - tick))
        tick = now
if rank == 0:
    print(json.dumps({"samples_per_s": statistics.median(rates[1:]), "first_step_time": first}), flush=True)
dist.barrier()  # leave together: gloo can abort at exit when a peer is already gone
dist.destroy_process_group()
