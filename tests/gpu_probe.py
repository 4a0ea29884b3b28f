"""Helpers of tests/test_gpu.py that run inside the launcher's ranks.

As a script (``python -m launcher --gpus N -- tests/gpu_probe.py OUT_DIR``): one DDP step of a tiny model on
fixed seeds through the trainer's own Comm (``workers.distributed.build_comm``: NCCL on CUDA, gloo on the CPU, with a
process group even at world size 1), then each rank writes ``OUT_DIR/rank<R>.pt``: where it ran (LOCAL_RANK,
``torch.cuda.current_device()``, the parameters' device, the backend) and its gradients after the all-reduce.
:func:`reference_grads` computes the same average in one process, for comparison.

As a model target (``model._target_=gpu_probe.AutocastMLP``, with ``tests/`` on PYTHONPATH): the default MLP that
raises unless its matmuls compute in the expected dtype, so a run that trains proves autocast was on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURES, CLASSES, BATCH = 16, 4, 8


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, CLASSES))


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's batch: fixed by r alone, on the CPU."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(BATCH, FEATURES, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def reference_grads(world_size: int) -> dict[str, torch.Tensor]:
    """What DDP's all-reduce must give every rank: the mean over ranks of each rank's gradients (CPU, fp32)."""
    model, total = tiny_model(), None
    for r in range(world_size):
        model.zero_grad()
        x, y = rank_batch(r)
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        total = grads if total is None else {n: total[n] + g for n, g in grads.items()}
    assert total is not None
    return {n: g / world_size for n, g in total.items()}


class AutocastMLP(nn.Module):
    """input -> hidden -> classes (ReLU) that refuses to run unless its Linear layers compute in ``dtype``."""

    def __init__(self, inputs: int, hidden: int, classes: int, dtype: str) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))
        self.dtype = getattr(torch, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if out.dtype != self.dtype:
            raise RuntimeError(f"the model computed in {out.dtype} on {out.device}, expected {self.dtype}")
        return out


class DropoutMLP(nn.Module):
    """input -> hidden -> classes with dropout: on the GPU its masks come from the CUDA generator, so a resumed run
    matches an uninterrupted one only if that generator's state is checkpointed and restored."""

    def __init__(self, inputs: int, hidden: int, classes: int, p: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def main(out: Path) -> None:
    import torch.distributed as dist

    from workers.distributed import build_comm
    from workers.distributed.env import DistEnv

    # fp32 matmuls on the GPU too (no TF32), so the gradients match the CPU's to float rounding
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    env = DistEnv.from_env(os.environ)
    comm = build_comm("ddp", env)  # DDPComm: the trainer's device choice (pick_device) and backend choice
    net = tiny_model().to(comm.device)
    model = comm.wrap_model(net)
    x, y = rank_batch(comm.rank)
    F.cross_entropy(model(x.to(comm.device)), y.to(comm.device)).backward()
    ones = torch.ones(4, device=comm.device)
    dist.all_reduce(ones)  # a collective of its own through the backend: world_size on every element
    record = {
        "allreduce": ones.cpu().tolist(),
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL_"))},
        "rank": comm.rank, "world_size": comm.world_size, "local_rank": comm.local_rank,
        "env_local_rank": int(os.environ["LOCAL_RANK"]), "device": str(comm.device),
        "current_device": torch.cuda.current_device() if torch.cuda.is_available() else None,
        "param_device": str(next(net.parameters()).device), "backend": str(dist.get_backend()),
        "grads": {n: p.grad.detach().cpu() for n, p in net.named_parameters()},
    }
    torch.save(record, out / f"rank{comm.rank}.pt")
    comm.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
