"""Pre-flight check: every rank reports where it runs; rank 0 prints one topology table and every
rank refuses to train when the nodes disagree (the decision is made from the same gathered data
on every rank, so all stop together)."""

from __future__ import annotations

import socket
from typing import Any

import torch

from workers.table import format_table


def describe_rank(rank: int, local_rank: int) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {"rank": rank, "local_rank": local_rank, "host": socket.gethostname(),
            "gpus": torch.cuda.device_count() if cuda else 0, "torch": str(torch.__version__),
            "device": f"cuda:{torch.cuda.current_device()}" if cuda else "cpu",
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "-"}


def table(ranks: list[dict[str, Any]]) -> str:
    cols = ("rank", "local_rank", "host", "device", "gpus", "torch", "nccl")
    return format_table([cols, *[tuple(str(r.get(c, "-")) for c in cols) for r in ranks]])


def problems(ranks: list[dict[str, Any]], local_world_size: int, device: str) -> list[str]:
    """What makes this set of ranks unfit to train together (empty when all is well)."""
    found = []
    versions = {r["torch"] for r in ranks}
    if len(versions) > 1:
        found.append(f"ranks run different torch versions: {', '.join(sorted(versions))}")
    nccl = {r["nccl"] for r in ranks}
    if device == "cuda" and len(nccl) > 1:
        found.append(f"ranks run different NCCL versions: {', '.join(sorted(nccl))}")
    if device == "cuda":
        short = sorted({r["host"] for r in ranks if r["gpus"] < local_world_size})
        if short:
            found.append(f"fewer GPUs than the {local_world_size} ranks per node on: {', '.join(short)}")
        seats = [(r["host"], r.get("device")) for r in ranks]
        shared = sorted({f"{h}:{d}" for h, d in seats if d and seats.count((h, d)) > 1})
        if shared:
            found.append(f"ranks share a GPU (one GPU per rank is the rule): {', '.join(shared)}")
    return found


def check(ranks: list[dict[str, Any]], is_main: bool, local_world_size: int, device: str) -> None:
    """Rank 0 prints the table; every rank raises on the same problems (they decide from the same data)."""
    if is_main:
        print(f"ranks:\n{table(ranks)}", flush=True)
    if found := problems(ranks, local_world_size, device):
        raise RuntimeError("pre-flight check failed: " + "; ".join(found))
