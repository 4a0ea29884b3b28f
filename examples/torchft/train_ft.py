"""A torchft program of your own, as torchft's examples write one; runs unmodified under the launcher:

    python -m launcher --gpus 2 --fault-tolerant -- examples/torchft/train_ft.py --steps 300

It reads what torchft's conventions put in the environment (REPLICA_GROUP_ID, NUM_REPLICA_GROUPS; the Manager
itself reads TORCHFT_LIGHTHOUSE, MASTER_ADDR/MASTER_PORT, RANK and WORLD_SIZE), fits y = 3x - 1 with torchft's
DistributedDataParallel and Optimizer, and prints its group, the step and the loss every 50 steps.
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import timedelta

import torch
from torch import nn
from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo, ProcessGroupNCCL


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to watch a failure)")
    args = parser.parse_args()
    group = int(os.environ.get("REPLICA_GROUP_ID", 0))
    groups = int(os.environ.get("NUM_REPLICA_GROUPS", 1))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = nn.Linear(1, 1).to(device)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": inner.state_dict()}

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["optim"])

    pg = ProcessGroupNCCL(timeout=timedelta(seconds=10)) if device.type == "cuda" else \
        ProcessGroupGloo(timeout=timedelta(seconds=5))
    manager = Manager(pg=pg, min_replica_size=1, load_state_dict=load_state_dict, state_dict=state_dict,
                      replica_id=f"example_{group}", timeout=timedelta(seconds=10))
    ddp = DistributedDataParallel(manager, model)
    optimizer = Optimizer(manager, inner)
    data = torch.Generator().manual_seed(1000 + group)  # each group its own samples
    while manager.current_step() < args.steps:
        x = torch.randn(32, 1, generator=data).to(device)
        optimizer.zero_grad()  # starts this step's quorum
        loss = nn.functional.mse_loss(ddp(x), 3 * x - 1)
        loss.backward()  # gradients averaged over the live groups
        optimizer.step()  # applied only if every participant's all-reduce succeeded
        if manager.current_step() % 50 == 0:
            print(f"group {group}/{groups} step {manager.current_step()} loss {loss.item():.4f} "
                  f"participants {manager.num_participants()}", flush=True)
        time.sleep(args.sleep)
    weight, bias = model.weight.item(), model.bias.item()
    print(f"group {group} done: y = {weight:.3f} x + {bias:.3f}", flush=True)
    manager.shutdown(wait=False)


if __name__ == "__main__":
    main()
