"""Streaming sources for mode=online: records as they arrive, each rank its own share, resumable.

A stream is a sequence of records in arrival order: the lines of a file being appended to (followed
like ``tail -f``), the lines of the shard files arriving in a directory (in name order), or a
synthetic generator. Every rank reads the whole stream; the good records are numbered 0, 1, 2, ...
and rank r of W trains those whose number is r modulo W, so no record is trained twice or skipped
across ranks, and bad lines (counted and reported by the rank whose turn their line number is) do
not leave one rank short of records. A reader's :class:`Position` (line and record numbers, shard,
byte offset of the next line) is what rank 0's checkpoint keeps for every rank.

A line is a record once it ends with a newline: a writer's half-written last line is left for later.
Shard writers should create each shard under a name starting with ``.`` or ending in ``.tmp`` and
rename it when complete (such names are ignored until then).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import torch

from workers.config import OnlineConfig


@dataclass(frozen=True)
class Position:
    index: int = 0  # number of the next good record
    line: int = 0  # number of the next line (good or bad)
    shard: str = ""  # shards: the file holding the next record ("" = before the first shard)
    offset: int = 0  # byte offset of the next record in the file or shard

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)


@dataclass(frozen=True)
class Record:
    index: int
    x: list[float]
    y: int


class BadRecord(ValueError):
    pass


def parse(line: str, fmt: str, num_features: int, num_classes: int) -> tuple[list[float], int]:
    """One record: JSON ``{"x": [...], "y": label}`` or ``[x..., label]``, or CSV ``x...,label``."""
    try:
        if fmt == "csv":
            *x, y = (float(v) for v in line.split(","))
        else:
            obj = json.loads(line)
            if isinstance(obj, dict):
                x, y = obj["x"], obj["y"]
            else:
                *x, y = obj
            x = [float(v) for v in x]
    except (ValueError, KeyError, TypeError) as e:
        raise BadRecord(f"cannot parse ({type(e).__name__}: {e})") from None
    if len(x) != num_features:
        raise BadRecord(f"{len(x)} features, expected {num_features}")
    if float(y) != int(y) or not 0 <= int(y) < num_classes:
        raise BadRecord(f"label {y!r} is not a class in 0..{num_classes - 1}")
    return x, int(y)


class _Lines:
    """Complete lines from a file or a shard directory, from a position on (None: nothing new yet)."""

    def __init__(self, path: Path, shards: bool, start: Position) -> None:
        self.path, self.shards, self.pos = path, shards, start
        self._f = None
        self._open_name = ""

    def _file(self) -> Path | None:
        if not self.shards:
            return self.path if self.path.exists() else None
        if self.pos.shard:
            return self.path / self.pos.shard
        first = self._later_shards("")
        if first:
            self.pos = Position(self.pos.index, self.pos.line, first[0], 0)
            return self.path / first[0]
        return None

    def _later_shards(self, after: str) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.is_file() and p.name > after and not p.name.startswith(".") and not p.name.endswith(".tmp"))

    def next_line(self) -> tuple[str, str] | None:
        """(text, where) of the next complete line, advancing the position; None if there is none yet."""
        while True:
            path = self._file()
            if path is None:
                return None
            if self._f is None or self._open_name != str(path):
                if self._f is not None:
                    self._f.close()
                self._f, self._open_name = open(path, "rb"), str(path)  # noqa: SIM115 (kept open between calls)
            self._f.seek(self.pos.offset)
            raw = self._f.readline()
            if raw.endswith(b"\n"):
                where = f"{path}:byte {self.pos.offset}"
                self.pos = Position(self.pos.index, self.pos.line + 1, self.pos.shard, self.pos.offset + len(raw))
                return raw.decode(errors="replace").rstrip("\r\n"), where
            if not self.shards:
                return None  # the end for now (or a half-written line): wait for the writer
            later = self._later_shards(self.pos.shard)
            if not later:
                return None
            self.pos = Position(self.pos.index, self.pos.line, later[0], 0)  # this shard is done: on to the next


class StreamReader:
    """This rank's records of the stream, in batches; counts and reports bad records."""

    def __init__(self, cfg: OnlineConfig, num_features: int, num_classes: int, rank: int, world: int,
                 start: Position, skip: Callable[[int], bool], seed: int) -> None:
        self.cfg, self.num_features, self.num_classes = cfg, num_features, num_classes
        self.rank, self.world, self.skip, self.seed = rank, world, skip, seed
        self.pos = start  # after the last record read
        self.bad = 0  # this rank's bad records
        self.pending: list[Record] = []
        self.last_arrival = time.monotonic()
        self.lines = _Lines(Path(cfg.path or "."), cfg.source == "shards", start) if cfg.source != "synthetic" else None
        if cfg.source == "synthetic":
            g = torch.Generator().manual_seed(seed + 1)
            self.teacher = torch.randn(num_features, num_classes, generator=g)

    def _synthetic(self) -> Iterator[tuple[int, list[float], int]]:
        i = self.pos.index
        if self.cfg.records and i >= self.cfg.records:
            return
        x = torch.randn(self.num_features, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + i))
        self.pos = Position(i + 1, i + 1)
        yield i, x.tolist(), int((x @ self.teacher).argmax())

    def _next(self) -> Record | None:
        """The next record of any rank (None: nothing new); bad ones of this rank are counted here."""
        if self.lines is None:
            for i, x, y in self._synthetic():
                return Record(i, x, y)
            return None
        got = self.lines.next_line()
        if got is None:
            return None
        text, where = got
        line = self.lines.pos.line - 1
        try:  # every rank parses every line: record numbers must agree on all ranks
            x, y = parse(text, self.cfg.format, self.num_features, self.num_classes)
        except BadRecord as e:
            self.pos = self.lines.pos
            if line % self.world == self.rank:  # one rank counts and reports each bad line
                self.bad += 1
                print(f"rank {self.rank}: skipping bad record on line {line} at {where}: {e}", file=sys.stderr,
                      flush=True)
            return Record(-1, [], -1)
        self.lines.pos = Position(self.lines.pos.index + 1, *astuple(self.lines.pos)[1:])
        self.pos = self.lines.pos
        return Record(self.pos.index - 1, x, y)

    def fill(self, wait_s: float) -> bool:
        """Read until this rank has a full batch or ``wait_s`` passed; True when the batch is ready."""
        deadline = time.monotonic() + wait_s
        while len(self.pending) < self.cfg.batch_size:
            record = self._next()
            if record is None:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(min(self.cfg.poll_s, max(0.0, deadline - time.monotonic())))
                continue
            self.last_arrival = time.monotonic()
            if record.index >= 0 and record.index % self.world == self.rank and not self.skip(record.index):
                self.pending.append(record)
        return True

    def finished(self) -> bool:
        """A finite synthetic stream has ended: nothing will ever arrive."""
        return self.lines is None and 0 < self.cfg.records <= self.pos.index

    def idle(self) -> bool:
        """Nothing new for longer than the idle timeout (never, with idle_timeout_s=0)."""
        if self.finished():
            return True
        t = self.cfg.idle_timeout_s
        return t > 0 and time.monotonic() - self.last_arrival > t

    def take(self) -> tuple[list[Record], Position]:
        """The full batch and the position after it (what a checkpoint taken after training it keeps)."""
        batch, self.pending = self.pending, []
        return batch, self.pos


def resume_point(positions: list[dict], world: int, rank: int) -> tuple[Position, Callable[[int], bool]]:
    """Where this rank starts reading after a restart, and which records it must pass over.

    Same world size: its own saved position. Another world size: the earliest saved position, passing
    over every record that its old owner (number modulo the old world size) had trained already."""
    old = [Position(**p) for p in positions]  # type: ignore[arg-type]
    if len(old) == world:
        return old[rank], lambda _index: False
    start = min(old, key=lambda p: p.index)
    return start, lambda index: index < old[index % len(old)].index
