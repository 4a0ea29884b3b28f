"""Run under torchrun: all-reduce timings over message sizes through the trainer's process group.

busbw = algbw * 2(n-1)/n, as nccl-tests computes it; memcpy bandwidth is the local limit.
"""

import json
import sys
import time

import torch
import torch.distributed as dist

top, repeats = int(sys.argv[1]), int(sys.argv[2])
backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank, n = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
rows, size = [], 4096
while size <= top:
    t = torch.ones(size // 4, device=device)
    dist.all_reduce(t)  # warm-up
    times = []
    for _ in range(max(3, repeats)):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    best = sorted(times)[len(times) // 2]
    algbw = size / best / 1e9
    rows.append({"bytes": size, "time_s": best, "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (n - 1) / n})
    size *= 4
src = torch.ones(top // 4, device=device)
dst = torch.empty_like(src)
dst.copy_(src)
start = time.perf_counter()
for _ in range(3):
    dst.copy_(src)
memcpy = 3 * top / (time.perf_counter() - start) / 1e9
if rank == 0:
    print(json.dumps({"backend": backend, "ranks": n, "sizes": rows, "memcpy_GBps": memcpy}), flush=True)
dist.destroy_process_group()
