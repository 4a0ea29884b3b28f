"""The input pipeline: this rank's batches through a DataLoader, resumable at any global sample.

``TrainLoader`` wraps ``torch.utils.data.DataLoader`` around the :class:`ResumableSampler`:
``data.num_workers`` worker processes decode samples, ``pin_memory`` (CUDA) page-locks the batches,
and the next batch is copied to the device with ``non_blocking=True`` while the current step
computes. In-memory ``TensorDataset``s take a fast path: one tensor index per batch instead of a
``__getitem__`` and collate per sample; without worker processes no DataLoader either — each batch's
indices are a slice of the epoch's index tensor (no Python list per batch).

The position that checkpoints keep — epoch, and global samples done in it — counts the batches the
training loop has *taken*, not those the workers have loaded ahead, so a resumed run continues with
the first sample not yet trained.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, TensorDataset

from workers import hooks
from workers.data.sampler import ResumableSampler


class _TensorBatches(Dataset):
    """Fast path for in-memory tensors: item = a whole batch, fetched with one index per tensor."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.tensors = dataset.tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, idx: list[int]) -> tuple[torch.Tensor, ...]:
        index = torch.as_tensor(idx)
        return tuple(t.index_select(0, index) for t in self.tensors)


class _Recorded(BatchSampler):
    """A BatchSampler that remembers the indices of the batches it handed out, in order (for hooks.batch_taken:
    the workers load ahead, so what the loop takes is the oldest of these)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handed: deque[list[int]] | None = None  # set to a deque when someone wants them

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            if self.handed is not None:
                self.handed.append(batch)
            yield batch


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    """Tensors (in tuples, lists, dicts) to the device; non_blocking overlaps the copy from pinned memory."""
    if isinstance(batch, torch.Tensor):
        out = batch.to(device, non_blocking=True)
        return out.contiguous(memory_format=torch.channels_last) if channels_last and out.dim() == 4 else out
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def batched_loader(dataset: Dataset, batches: Any, **loader_kw: Any) -> DataLoader:
    """A DataLoader over ``batches`` (lists of indices); in-memory tensors take the fast path: one index per batch."""
    if isinstance(dataset, TensorDataset):
        return DataLoader(_TensorBatches(dataset), batch_size=None, sampler=batches, **loader_kw)
    return DataLoader(dataset, batch_sampler=batches, **loader_kw)


def shard_loader(dataset: Dataset, rank: int, world_size: int, batch_size: int,
                 loader_kw: dict[str, Any]) -> DataLoader:
    """This rank's share of ``dataset`` for evaluation: every ``world_size``-th sample from ``rank``, in order.
    In-memory tensors are sliced in this process (workers would only add start-up time)."""
    batches = BatchSampler(range(rank, len(dataset), world_size), batch_size, drop_last=False)  # type: ignore[arg-type]
    if isinstance(dataset, TensorDataset):
        loader_kw = {}
    return batched_loader(dataset, batches, **loader_kw)


def loader_kwargs(data: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """DataLoader keyword arguments from the `data` config's own keys."""
    workers = int(data.get("num_workers", 0))
    kw: dict[str, Any] = {"num_workers": workers, "pin_memory": bool(data.get("pin_memory")) and device.type == "cuda"}
    if workers > 0:
        kw["persistent_workers"] = bool(data.get("persistent_workers", True))
        kw["prefetch_factor"] = int(data.get("prefetch_factor", 2))
    return kw


class TrainLoader:
    """Endless batches of this rank's share of ``dataset``, epoch after epoch, already on ``device``."""

    def __init__(self, dataset: Dataset, batch_size: int, world_size: int, rank: int, seed: int,
                 device: torch.device, loader_kw: dict[str, Any], channels_last: bool = False) -> None:
        self.dataset = dataset
        self.sampler = ResumableSampler(dataset, world_size, rank, seed)
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.device, self.channels_last = device, channels_last
        self.batches = _Recorded(self.sampler, batch_size, drop_last=True)
        self.generator = torch.Generator()  # worker seeds: not drawn from the training RNG
        self.loader = batched_loader(dataset, self.batches, generator=self.generator, **loader_kw)
        # in-memory tensors and no worker processes: batches sliced straight from the tensors (_sliced)
        self.tensors = dataset.tensors if isinstance(dataset, TensorDataset) and not loader_kw["num_workers"] else None
        self.pin = bool(loader_kw.get("pin_memory"))
        if len(self.sampler) < batch_size:
            raise ValueError(f"the training set has {len(dataset)} samples: fewer than one batch of {batch_size} "  # type: ignore[arg-type]
                             f"per rank for {world_size} ranks. HINT: lower data.batch_size")
        self.epoch, self.position = 0, 0  # what the training loop has taken: epoch, global samples in it

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "epoch_pos": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["epoch_pos"]

    def close(self) -> None:
        """Stop the worker processes now (persistent workers otherwise outlive a rank that exits with os._exit
        by the seconds their parent-death watchdog takes)."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None  # type: ignore[attr-defined]

    def _batches_left(self, position: int) -> int:
        return (self.sampler.total_size - position) // self.world_size // self.batch_size

    def _sliced(self) -> Iterator[Any]:
        """The fast path's batches from the current position on, across epochs: the same samples in the same
        order as the DataLoader's (the sampler's indices, batch_size at a time, the last partial batch dropped)."""
        assert self.tensors is not None
        epoch, position = self.epoch, self.position
        while True:
            self.sampler.set_epoch(epoch, start=position)
            order = self.sampler.indices()
            for first in range(0, len(order) - self.batch_size + 1, self.batch_size):
                index = order[first : first + self.batch_size]
                if self.batches.handed is not None:
                    self.batches.handed.append(index.tolist())
                batch = tuple([t.index_select(0, index) for t in self.tensors])  # index_select: half of t[index]
                yield tuple(b.pin_memory() for b in batch) if self.pin else batch
            epoch, position = epoch + 1, 0

    def _loaded(self) -> Iterator[Any]:
        """The DataLoader's batches from the current position on, across epochs."""
        if self.tensors is not None:
            yield from self._sliced()
            return
        epoch, position = self.epoch, self.position
        while True:
            self.sampler.set_epoch(epoch, start=position)
            # worker processes seed their RNGs from this when they start (once, with persistent workers): the
            # same per rank in every run, so identical runs match. Random augmentation that must also match
            # across a mid-epoch resume should derive its randomness from the sample index.
            self.generator.manual_seed(self.seed * 1_000_003 + self.rank)
            yield from self.loader
            epoch, position = epoch + 1, 0

    def __iter__(self) -> Iterator[Any]:
        # hooks.batch_taken: this pass's batches' indices, recorded as the sampler hands them out (None: no record)
        handed = self.batches.handed = deque() if hooks.batch_taken else None
        ahead = None  # the next batch, already on its way to the device
        move = self.device.type != "cpu" or self.channels_last  # a CPU tensor to the CPU is itself: skip the calls
        for batch in self._loaded():
            if move:
                batch = to_device(batch, self.device, self.channels_last)
            if ahead is not None:
                yield self._take(ahead, handed)
            ahead = batch

    def _take(self, batch: Any, handed: deque[list[int]] | None) -> Any:
        self.position += self.batch_size * self.world_size
        if self._batches_left(self.position) == 0:
            self.epoch, self.position = self.epoch + 1, 0
        if handed is not None:
            hooks.batch_taken(self, handed.popleft())
        return batch
