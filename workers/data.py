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

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, TensorDataset

from workers.config import DataConfig


@dataclass(frozen=True)
class Splits:
    train: Dataset
    test: Dataset
    num_features: int
    num_classes: int  # classes, or the vocabulary size for token data
    context: int = 0  # tokens per window (token data only)


class TokenWindows(Dataset):
    """Non-overlapping windows of a flat token array: item i -> (tokens[iT:(i+1)T], the same shifted by 1)."""

    def __init__(self, tokens: np.ndarray, context: int, first: int, count: int) -> None:
        self.tokens, self.context, self.first, self.count = tokens, context, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = (self.first + i) * self.context
        chunk = torch.from_numpy(self.tokens[start : start + self.context + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


def _token_splits(tokens: np.ndarray, cfg: DataConfig) -> Splits:
    windows = (len(tokens) - 1) // cfg.context
    n_test = max(1, int(windows * cfg.test_fraction))
    return Splits(TokenWindows(tokens, cfg.context, 0, windows - n_test),
                  TokenWindows(tokens, cfg.context, windows - n_test, n_test), cfg.context, cfg.vocab_size,
                  cfg.context)


def synthetic_tokens(cfg: DataConfig) -> np.ndarray:
    """A random first-order Markov chain over the vocabulary: learnable structure, no download."""
    g = np.random.default_rng(cfg.split_seed)
    successors = g.integers(0, cfg.vocab_size, size=(cfg.vocab_size, 4))  # each token has 4 likely successors
    picks = g.integers(0, 4, size=cfg.num_samples * cfg.context + 1)
    out = np.empty(len(picks), dtype=np.uint16)
    out[0] = 0
    for i in range(1, len(out)):
        out[i] = successors[out[i - 1], picks[i]]
    return out


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
    if cfg.name == "tokens":  # a token file as nanoGPT's prepare scripts write it, read lazily
        return _token_splits(np.memmap(cfg.path, dtype=np.uint16, mode="r"), cfg)
    if cfg.name == "synthetic_tokens":
        return _token_splits(synthetic_tokens(cfg), cfg)
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
