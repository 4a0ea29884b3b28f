"""Streaming sources for online training: a followed file, a directory of shards, a synthetic stream.

Every source numbers its records; rank ``r`` of ``W`` takes the records whose number ``% W == r``
(for shards: the shards whose number ``% W == r``), so no record is trained twice or skipped across
ranks. A reader *peeks* a batch and only :meth:`commit` moves its position, so a batch that was read
but not trained (say the run ended on an idle timeout) is read again after a restart.

Positions are small dicts (byte offset and record number; shard name) that rank 0 stores in its
checkpoints, one per rank.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.data import load_digits_tensors


@dataclass
class Record:
    x: torch.Tensor
    y: int
    number: int  # the record's number in the stream


@dataclass
class StreamStats:
    bad: int = 0  # malformed records skipped (by this rank)


def parse(line: str, fmt: str, num_features: int) -> tuple[list[float], int]:
    """One JSON-lines ({"x": [...], "y": k} or [f1..fn, y]) or CSV (f1,...,fn,y) record."""
    if fmt == "jsonl":
        obj = json.loads(line)
        values = [*obj["x"], obj["y"]] if isinstance(obj, dict) else obj
    else:
        values = [float(v) for v in line.split(",")]
    if len(values) != num_features + 1:
        raise ValueError(f"{len(values) - 1} features, expected {num_features}")
    label = values[-1]
    if int(label) != label:
        raise ValueError(f"label {label!r} is not an integer")
    return [float(v) for v in values[:-1]], int(label)


@dataclass
class FileStream:
    """A file that is being appended to, followed like ``tail -f``."""

    path: Path
    rank: int
    world: int
    fmt: str
    num_features: int
    position: dict[str, int] = field(default_factory=lambda: {"offset": 0, "record": 0})
    stats: StreamStats = field(default_factory=StreamStats)

    def peek(self, k: int) -> tuple[list[Record], dict[str, int]]:
        """Up to ``k`` of this rank's records after the committed position, and the position after them."""
        out: list[Record] = []
        offset, number = self.position["offset"], self.position["record"]
        if not self.path.exists():
            return out, dict(self.position)
        with open(self.path, "rb") as f:
            f.seek(offset)
            while len(out) < k:
                raw = f.readline()
                if not raw.endswith(b"\n"):  # nothing more, or a line still being written
                    break
                offset += len(raw)
                mine = number % self.world == self.rank
                if mine and raw.strip():
                    try:
                        x, y = parse(raw.decode(), self.fmt, self.num_features)
                        out.append(Record(torch.tensor(x), y, number))
                    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
                        self.stats.bad += 1
                        print(f"WARNING: skipped bad record {number} at byte {offset - len(raw)} of {self.path}: "
                              f"{e}", file=sys.stderr, flush=True)
                number += 1
        return out, {"offset": offset, "record": number}

    def commit(self, position: dict[str, Any]) -> None:
        self.position = dict(position)


@dataclass
class ShardStream:
    """A directory where shard files arrive (written elsewhere, then renamed in); shard i -> rank i % W."""

    path: Path
    rank: int
    world: int
    fmt: str
    num_features: int
    position: dict[str, Any] = field(default_factory=lambda: {"shard": "", "offset": 0, "record": 0})
    stats: StreamStats = field(default_factory=StreamStats)

    def _mine(self) -> list[Path]:
        shards = sorted(p for p in self.path.glob(f"*.{self.fmt}") if p.is_file())
        return [p for i, p in enumerate(shards) if i % self.world == self.rank]

    def peek(self, k: int) -> tuple[list[Record], dict[str, Any]]:
        out: list[Record] = []
        pos = dict(self.position)
        for shard in self._mine():
            if shard.name < pos["shard"]:
                continue
            if shard.name > pos["shard"]:
                pos = {"shard": shard.name, "offset": 0, "record": pos["record"]}
            reader = FileStream(shard, 0, 1, self.fmt, self.num_features, {"offset": pos["offset"], "record": 0},
                                self.stats)
            got, p = reader.peek(k - len(out))
            out += [Record(r.x, r.y, pos["record"] + i) for i, r in enumerate(got)]
            pos = {"shard": shard.name, "offset": p["offset"], "record": pos["record"] + p["record"]}
            if len(out) == k:
                break
        return out, pos

    def commit(self, position: dict[str, Any]) -> None:
        self.position = dict(position)


@dataclass
class SyntheticStream:
    """An endless stream of the digits images in a fixed shuffled order (for tests and benchmarks)."""

    rank: int
    world: int
    seed: int = 0
    position: dict[str, int] = field(default_factory=lambda: {"record": 0})
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self) -> None:
        self.x, self.y = load_digits_tensors()
        self.order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.seed))

    def peek(self, k: int) -> tuple[list[Record], dict[str, int]]:
        number = self.position["record"]
        first = number + (self.rank - number) % self.world  # this rank's next record number
        out = []
        for n in range(first, first + k * self.world, self.world):
            i = int(self.order[n % len(self.order)])
            out.append(Record(self.x[i], int(self.y[i]), n))
        return out, {"record": first + k * self.world - self.rank}

    def commit(self, position: dict[str, Any]) -> None:
        self.position = dict(position)


def wait_for_batch(stream: Any, k: int, poll_s: float, idle_timeout_s: float) -> list[Record] | None:
    """Block until ``k`` records are there (polling), or None after ``idle_timeout_s`` of silence."""
    deadline = time.monotonic() + idle_timeout_s
    while True:
        records, position = stream.peek(k)
        if len(records) == k:
            stream.pending = position
            return records
        if time.monotonic() > deadline:
            return None
        time.sleep(poll_s)
