"""The resumable distributed sampler.

The position in an epoch is kept in *global* samples: the sampler shuffles the whole dataset with
``seed + epoch`` (as DistributedSampler does) and rank ``r`` of ``W`` takes every ``W``-th index
after ``start``. After ``k`` steps of ``B`` samples per rank the first ``k*B*W`` shuffled indices
are done whatever ``W`` was, so a resumed run, even with another world size, continues with exactly
the samples not yet seen in this epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, at a global sample offset."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        # drop_last: every rank gets the same number of samples, so no rank waits on a missing step
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def indices(self) -> torch.Tensor:
        """This rank's dataset indices for the epoch from ``start`` on, in order: a tensor (the loader slices its
        batches from it)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        rest = torch.randperm(len(self.dataset), generator=g)[self.start : self.total_size]  # type: ignore[arg-type]
        usable = len(rest) - len(rest) % self.num_replicas
        return rest[self.rank : usable : self.num_replicas].contiguous()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return (self.total_size - self.start) // self.num_replicas
