"""Datasets and the resumable distributed sampler.

The position in an epoch is kept in *global* samples: the sampler shuffles the whole dataset with
``seed + epoch`` (as DistributedSampler does) and rank ``r`` of ``W`` takes every ``W``-th index
after ``start``. After ``k`` steps of ``B`` samples per rank the first ``k*B*W`` shuffled indices
are done whatever ``W`` was, so a resumed run, even with another world size, continues with exactly
the samples not yet seen in this epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler, TensorDataset

from workers.config import DataConfig


@dataclass(frozen=True)
class Splits:
    train: TensorDataset
    test: TensorDataset
    num_features: int
    num_classes: int


def _split(x: torch.Tensor, y: torch.Tensor, cfg: DataConfig, num_classes: int) -> Splits:
    g = torch.Generator().manual_seed(cfg.split_seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * cfg.test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return Splits(TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test]), x.shape[1], num_classes)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, pixels scaled from 0..16 to 0..1."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def synthetic_tensors(cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features labelled by a fixed random linear teacher (learnable, not trivial)."""
    g = torch.Generator().manual_seed(cfg.split_seed + 1)
    x = torch.randn(cfg.num_samples, cfg.num_features, generator=g)
    teacher = torch.randn(cfg.num_features, cfg.num_classes, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def build_data(cfg: DataConfig) -> Splits:
    if cfg.name == "digits":
        x, y = load_digits_tensors()
        return _split(x, y, cfg, 10)
    x, y = synthetic_tensors(cfg)
    return _split(x, y, cfg, cfg.num_classes)


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

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()[: self.total_size]  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        rest = self._order()[self.start :]
        usable = len(rest) - len(rest) % self.num_replicas
        return iter(rest[self.rank : usable : self.num_replicas])

    def __len__(self) -> int:
        return (self.total_size - self.start) // self.num_replicas
