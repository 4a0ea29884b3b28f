"""A Horovod Elastic program of your own, as Horovod's elastic examples write one; runs unmodified under the
launcher, which supplies horovodrun's elastic flags and the host discovery script:

    python -m launcher --backend horovod --gpus 2 --fault-tolerant -- examples/horovod_elastic/train_elastic.py

It fits y = 3x - 1 under ``hvd.elastic.run`` with a ``TorchState`` committed every 10 steps, and prints its rank,
the world size, the step and the loss every 50 steps (and a line at each reset).
"""

from __future__ import annotations

import argparse
import time

import horovod.torch as hvd
import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step (to watch a failure)")
    args = parser.parse_args()
    hvd.init()
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                         named_parameters=model.named_parameters())
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, step=0)
    state.register_reset_callbacks([lambda: print(f"reset: rank {hvd.rank()} of {hvd.size()}", flush=True)])

    @hvd.elastic.run
    def train(state: hvd.elastic.TorchState) -> None:
        generator = torch.Generator().manual_seed(hvd.rank() * 100_003 + state.step)
        while state.step < args.steps:
            x = torch.randn(32, 1, generator=generator)
            loss = nn.functional.mse_loss(model(x), 3 * x - 1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            state.step += 1
            if state.step % 10 == 0:
                state.commit()
            if state.step % 50 == 0:
                print(f"rank {hvd.rank()} of {hvd.size()} step {state.step} loss {loss.item():.4f}", flush=True)
            time.sleep(args.sleep)

    train(state)
    w, b = model.weight.item(), model.bias.item()
    print(f"rank {hvd.rank()}: done at step {state.step}: w {w:.3f} b {b:.3f}", flush=True)


if __name__ == "__main__":
    main()
