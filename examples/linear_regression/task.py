"""The data function and a metric of the linear regression example (see __init__.py for the command)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def make_data(num_samples: int = 1024, slope: float = 2.0, intercept: float = 0.0, noise: float = 0.1,
              eval_fraction: float = 0.2, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """x uniform in [-1, 1], y = slope * x + intercept + Gaussian noise; both (N, 1) float tensors.
    The samples (and the split) depend on ``seed`` only, so every rank builds the same data."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num_samples, 1, generator=g) * 2 - 1
    y = slope * x + intercept + noise * torch.randn(num_samples, 1, generator=g)
    n_eval = int(num_samples * eval_fraction)
    return TensorDataset(x[n_eval:], y[n_eval:]), TensorDataset(x[:n_eval], y[:n_eval])


def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the batch (a metric returns the batch mean; the trainer averages over batches)."""
    return (outputs - targets).abs().mean()
