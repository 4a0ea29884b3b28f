"""Rank-0 checkpoints that survive crashes: atomic files, a manifest, keep-last-K, verified loads.

Layout (``RUN_DIR/checkpoints/``)::

    step-00000040.pt     torch.save of {"model", "optimizer", "train_state", "rng", "config", "meta"}
    step-00000040.json   manifest: step, size, sha256, format, world_size, config_hash, ...

Each file is written to a temp file in the same directory, fsynced, renamed, and the directory is
fsynced; the manifest is written last, so a checkpoint counts only once its manifest exists. A load
verifies size and sha256 and falls back to the previous checkpoint with a warning when the newest is
damaged. Every rank calls :meth:`CheckpointManager.save` and :meth:`load`; only rank 0 writes, and
all ranks meet at a barrier, so callers never test the rank.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers import contract, hooks
from workers.files import atomic_write

FORMAT_VERSION = 1
MODEL, OPTIMIZER, TRAIN_STATE, RNG, CONFIG, META = "model", "optimizer", "train_state", "rng", "config", "meta"
_NAME = re.compile(r"^step-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


def should_save(step: int, last_step: bool, every: int) -> bool:
    return last_step or step % every == 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_steps(directory: Path) -> list[int]:
    """Steps that have a checkpoint file, newest first."""
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(steps, reverse=True)


def ckpt_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def verify(directory: Path, step: int) -> str | None:
    """None if checkpoint ``step`` is complete and intact, else why not."""
    path, manifest_path = ckpt_path(directory, step), ckpt_path(directory, step).with_suffix(".json")
    if not manifest_path.exists():
        return "no manifest (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest: {e}"
    if manifest.get("format") != FORMAT_VERSION:
        return f"format {manifest.get('format')} is not {FORMAT_VERSION}"
    if not path.exists() or path.stat().st_size != manifest["size"]:
        return f"size differs from manifest ({manifest['size']} bytes)"
    if _sha256(path) != manifest["sha256"]:
        return "sha256 differs from manifest"
    return None


def latest_valid(directory: Path, warn: Callable[[str], None]) -> int | None:
    for step in list_steps(directory):
        problem = verify(directory, step)
        if problem is None:
            return step
        warn(f"checkpoint {ckpt_path(directory, step)} is unusable ({problem}); trying the previous one")
    return None


class _HashingWriter:
    """File wrapper that hashes what passes through, so the manifest needs no second read."""

    def __init__(self) -> None:
        self.f: Any = None
        self.sha = hashlib.sha256()
        self.error: OSError | None = None  # torch.save's C++ writer replaces it with a vague RuntimeError

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        if hooks.checkpoint_write:
            hooks.checkpoint_write(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _to_cpu(obj: Any, reuse: Any = None) -> Any:
    """Deep copy with every tensor copied to CPU memory: a snapshot training can't change.

    ``reuse`` is the previous snapshot (already on disk): its tensors are copied into where shapes
    match, which skips allocating (and page-faulting) hundreds of MB on every save. GPU tensors go
    to page-locked memory without blocking (a DMA at full bus speed, all queued at once); the
    caller waits for the copies with :func:`_snapshot`."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if isinstance(reuse, torch.Tensor) and reuse.shape == t.shape and reuse.dtype == t.dtype:
            return reuse.copy_(t, non_blocking=t.is_cuda and reuse.is_pinned())
        if t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        return t.to("cpu", copy=True)
    if isinstance(obj, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {k: _to_cpu(v, reuse.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(_to_cpu(v, r) for v, r in zip(obj, reuse, strict=True))
    return obj


def _snapshot(state: dict[str, Any], reuse: Any) -> Any:
    """:func:`_to_cpu` of the state, its GPU copies finished: the writer thread reads it while training goes on."""
    snapshot = _to_cpu(state, reuse)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the non-blocking copies above have landed
    return snapshot


class CheckpointManager:
    """Rank 0 saves; with ``async_save`` a background thread writes a CPU snapshot (one in flight)."""

    def __init__(self, directory: Path, comm: Any, every: int, keep: int, meta: dict[str, Any],
                 async_save: bool = False) -> None:
        self.directory, self.comm, self.every, self.keep, self.meta = directory, comm, every, keep, meta
        self.async_save = async_save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._snapshot: Any = None  # the last async snapshot; its memory is reused by the next one

    def _warn(self, msg: str) -> None:
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    def save(self, step: int, last_step: bool, state: Callable[[], dict[str, Any]],
             force: bool = False) -> float | None:
        """Save if due (or forced); returns the training stall in seconds on rank 0, else None."""
        if not (force or should_save(step, last_step, self.every)):
            return None
        start = time.perf_counter()
        if self.comm.is_main:
            self.wait()  # at most one save in flight
            if self.async_save and not (last_step or force):
                snapshot = self._snapshot = _snapshot(state(), self._snapshot)
                self._thread = threading.Thread(target=self._write_async, args=(step, snapshot),
                                                name=f"checkpoint-{step}", daemon=True)
                self._thread.start()
            else:  # final and signal-triggered saves are on disk before we go on
                self._write(step, state())
        self.comm.barrier()  # nobody runs ahead of rank 0's snapshot
        return time.perf_counter() - start if self.comm.is_main else None

    def wait(self) -> None:
        """Block until the save in flight is on disk; re-raise its error here, in the training thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write_async(self, step: int, state: dict[str, Any]) -> None:
        try:
            self._write(step, state)
        except BaseException as e:  # surfaced by the next save() or wait()
            self._error = e

    def _write(self, step: int, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = ckpt_path(self.directory, step)
        state[META] = {**self.meta, "step": step, "format": FORMAT_VERSION}
        hashing = _HashingWriter()

        def dump(f: Any) -> None:
            hashing.f = f
            torch.save(state, hashing)

        try:
            atomic_write(path, dump, durable=True)
            manifest = {**state[META], "file": path.name, "size": path.stat().st_size,
                        "sha256": hashing.sha.hexdigest()}
            atomic_write(path.with_suffix(".json"), lambda f: f.write(json.dumps(manifest, indent=1).encode()),
                         durable=True)
        except (OSError, RuntimeError) as e:
            cause = hashing.error or e
            reason = getattr(cause, "strerror", None) or str(cause)
            raise CheckpointError(f"could not write checkpoint {path}: {reason}; "
                                  "earlier checkpoints are untouched. HINT: free space or fix permissions "
                                  f"on {self.directory}") from e
        self._purge()

    def _purge(self) -> None:
        for step in list_steps(self.directory)[self.keep :]:
            for p in (ckpt_path(self.directory, step), ckpt_path(self.directory, step).with_suffix(".json")):
                p.unlink(missing_ok=True)

    def load(self, step: int | None = None) -> dict[str, Any] | None:
        """Newest intact checkpoint (or ``step``), loaded on every rank; None if there is none."""
        if self.comm.is_main:
            if step is None:
                step = latest_valid(self.directory, self._warn)
            elif (problem := verify(self.directory, step)) is not None:
                raise CheckpointError(f"checkpoint step {step} in {self.directory}: {problem}")
        step = self.comm.broadcast_object(step)
        if step is None:
            return None
        # weights_only: a checkpoint is data, never code
        return torch.load(ckpt_path(self.directory, step), map_location="cpu", weights_only=True)


def for_run(run_dir: Path, comm: Any, cfg: dict[str, Any], every: int, keep: int, async_save: bool
            ) -> CheckpointManager:
    """The run's manager (RUN_DIR/checkpoints); the metadata a resume checks: the world, the comm, the config's
    hash and torch's version."""
    config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    meta = {"world_size": comm.world_size, "comm": comm.name, "config_hash": config_hash,
            "torch_version": str(torch.__version__)}
    return CheckpointManager(contract.checkpoint_dir(run_dir), comm, every, keep, meta, async_save=async_save)
