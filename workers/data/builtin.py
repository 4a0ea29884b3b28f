"""Built-in example datasets (``data._target_`` in configs/data/): each a function returning (train, eval).

A user's data function has the same shape: keyword arguments from the config in, two map-style
datasets of ``(input, target)`` pairs out (eval may be None). In-memory ``TensorDataset``s take the
loader's fast path (one tensor index per batch, no per-sample collate).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset


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


def token_splits(tokens: np.ndarray, context: int, test_fraction: float) -> tuple[Dataset, Dataset]:
    windows = (len(tokens) - 1) // context
    n_test = max(1, int(windows * test_fraction))
    return TokenWindows(tokens, context, 0, windows - n_test), TokenWindows(tokens, context, windows - n_test, n_test)


def markov_tokens(num_samples: int, context: int, vocab_size: int, seed: int) -> np.ndarray:
    """A random first-order Markov chain over the vocabulary: learnable structure, no download."""
    g = np.random.default_rng(seed)
    successors = g.integers(0, vocab_size, size=(vocab_size, 4))  # each token has 4 likely successors
    picks = g.integers(0, 4, size=num_samples * context + 1)
    out = np.empty(len(picks), dtype=np.uint16)
    out[0] = 0
    for i in range(1, len(out)):
        out[i] = successors[out[i - 1], picks[i]]
    return out


def split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, split_seed: int) -> tuple[Dataset, Dataset]:
    """A held-out split fixed by ``split_seed`` (independent of the training seed)."""
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, pixels scaled from 0..16 to 0..1.

    Read from the CSV that ships inside scikit-learn (what ``load_digits`` reads), without importing
    scikit-learn: that import costs seconds, paid again by every rank of every restart."""
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is None or not csv.is_file():  # another layout: scikit-learn's own loader
        from sklearn.datasets import load_digits

        d = load_digits()
        return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return torch.from_numpy(table[:, :-1]) / 16.0, torch.from_numpy(table[:, -1].astype(np.int64))


def digits(test_fraction: float = 0.2, split_seed: int = 0) -> tuple[Dataset, Dataset]:
    """scikit-learn's 8x8 handwritten digits (1797 images, 64 features, 10 classes; no download)."""
    return split(*load_digits_tensors(), test_fraction, split_seed)


def synthetic(num_samples: int, num_features: int, num_classes: int, test_fraction: float = 0.1,
              split_seed: int = 0) -> tuple[Dataset, Dataset]:
    """Gaussian features labelled by a fixed random linear teacher (learnable, not trivial)."""
    g = torch.Generator().manual_seed(split_seed + 1)
    x = torch.randn(num_samples, num_features, generator=g)
    teacher = torch.randn(num_features, num_classes, generator=g)
    return split(x, (x @ teacher).argmax(dim=1), test_fraction, split_seed)


def tokens(path: str, context: int, vocab_size: int, test_fraction: float = 0.01) -> tuple[Dataset, Dataset]:
    """A flat uint16 token file as nanoGPT's prepare scripts write it, read lazily with numpy.memmap.
    (``vocab_size`` is the model's; ids in the file must be below it.)"""
    return token_splits(np.memmap(path, dtype=np.uint16, mode="r"), context, test_fraction)


def synthetic_tokens(num_samples: int, context: int, vocab_size: int, test_fraction: float = 0.05,
                     split_seed: int = 0) -> tuple[Dataset, Dataset]:
    return token_splits(markov_tokens(num_samples, context, vocab_size, split_seed), context, test_fraction)
