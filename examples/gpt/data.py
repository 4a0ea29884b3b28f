"""The data function: a flat uint16 token file -> (train, eval) datasets of (x, y) windows, y = x shifted by one.

The file is read with numpy.memmap, opened lazily in each process that reads it (the training
process or a DataLoader worker), so a dataset bigger than memory costs only the pages it touches.
The eval split is the file's last ``eval_fraction``, so no training window overlaps it. See
__init__.py for the command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class Windows(Dataset):
    """Item i: ``(tokens[s : s + context], tokens[s + 1 : s + context + 1])`` for the i-th start s, as int64."""

    def __init__(self, path: str, context: int, starts: np.ndarray) -> None:
        self.path, self.context, self.starts = path, context, starts
        self._tokens: np.ndarray | None = None  # not pickled open: each worker maps the file itself

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        s = int(self.starts[i])
        chunk = torch.from_numpy(self._tokens[s : s + self.context + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None}


def token_windows(path: str, context: int = 128, eval_fraction: float = 0.1,
                  stride: int | None = None) -> tuple[Dataset, Dataset | None]:
    """Training windows every ``stride`` tokens (default: ``context``, no overlap) over the first
    1 - eval_fraction of the file; eval windows, not overlapping, over the rest (None if too short)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"data.path={path}: no such file. HINT: python examples/gpt/make_tokens.py TEXT OUT")
    n = len(np.memmap(path, dtype=np.uint16, mode="r"))
    cut = int(n * (1 - eval_fraction))
    train = np.arange(0, cut - context, stride or context)
    held_out = np.arange(cut, n - context, context)
    if len(train) == 0:
        raise ValueError(f"data.path={path} has {n} tokens: too few for windows of data.context={context}")
    return Windows(path, context, train), Windows(path, context, held_out) if len(held_out) else None
