"""Run under torchrun: all-reduce timings over message sizes through the trainer's process group.

busbw = algbw * 2(n-1)/n, as nccl-tests computes it; memcpy bandwidth is the local limit. On CUDA each rank
uses GPU LOCAL_RANK and NCCL, and a timing is the mean of several calls between two device syncs (one NCCL
call of a small message is shorter than the launch and sync around it).
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

top, repeats = int(sys.argv[1]), int(sys.argv[2])
cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = torch.device("cuda", torch.cuda.current_device())
else:
    device = torch.device("cpu")
backend = "nccl" if cuda else "gloo"
dist.init_process_group(backend)
rank, n = dist.get_rank(), dist.get_world_size()
calls = 10 if cuda else 1  # all-reduces per timing


def sync() -> None:
    if cuda:
        torch.cuda.synchronize(device)


def barrier() -> None:
    if cuda:
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
    sync()


rows, size = [], 4096
while size <= top:
    t = torch.ones(size // 4, device=device)
    dist.all_reduce(t)  # warm-up
    times = []
    for _ in range(max(3, repeats)):
        barrier()
        start = time.perf_counter()
        for _ in range(calls):
            dist.all_reduce(t)
        sync()
        times.append((time.perf_counter() - start) / calls)
    best = sorted(times)[len(times) // 2]
    algbw = size / best / 1e9
    rows.append({"bytes": size, "time_s": best, "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (n - 1) / n})
    size *= 4
src = torch.ones(top // 4, device=device)
dst = torch.empty_like(src)
dst.copy_(src)
sync()
start = time.perf_counter()
for _ in range(3):
    dst.copy_(src)
sync()
memcpy = 3 * top / (time.perf_counter() - start) / 1e9
if rank == 0:
    print(json.dumps({"backend": backend, "ranks": n, "sizes": rows, "memcpy_GBps": memcpy,
                      "device": torch.cuda.get_device_name(device) if cuda else "cpu"}), flush=True)
dist.destroy_process_group()
