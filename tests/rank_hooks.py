"""The tests' knobs inside the ranks: hook callbacks (workers/hooks.py), each registered only when its variable is
set. Every rank a test starts imports this module (conftest.py sets ``LAUNCHER_HOOKS=tests.rank_hooks``; the
ranks' PYTHONPATH holds the checkout, so ``tests`` imports as a namespace package); the recovery bench borrows
the slow-step and hang knobs the same way.

``LAUNCHER_TEST_SLOW_SAVE_S``    seconds to pause on every write() into a checkpoint file, so a test can kill
                                 rank 0 in the middle of a save.
``LAUNCHER_TEST_SLOW_STEP_S``    seconds to pause after every training step, so a test can act mid-run.
``LAUNCHER_TEST_SLOW_DATA_S``    seconds to pause before every micro-batch's forward, inside the rank's measured
                                 local step time, as a slow input pipeline would (a straggler).
``LAUNCHER_TEST_SLOW_RESTART_S`` seconds a restarted rank (attempt > 0) pauses before it reports in, as slow
                                 imports (a cold shared filesystem) would.
``LAUNCHER_TEST_SLOW_RANK``      a rank: the step and data pauses apply on that rank only (unset: every rank).
``LAUNCHER_TEST_SAMPLE_LOG``     directory: each rank appends a line per batch it trains on to ``rank<R>.txt``:
                                 the epoch, then the dataset indices (mode=online: the step, then the records'
                                 numbers), so a test can check which samples an epoch saw.
``LAUNCHER_TEST_HANG``           ``RANK:STEP``: that rank stops for an hour after that step, in the first attempt
                                 only (a restart runs on), so a test can watch the hang detection.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from workers import hooks
from workers.rank import current_attempt


def _seconds(name: str) -> float:
    return float(os.environ.get(name, "0") or 0)


SLOW_SAVE_S = _seconds("LAUNCHER_TEST_SLOW_SAVE_S")
SLOW_STEP_S = _seconds("LAUNCHER_TEST_SLOW_STEP_S")
SLOW_DATA_S = _seconds("LAUNCHER_TEST_SLOW_DATA_S")
SLOW_RESTART_S = _seconds("LAUNCHER_TEST_SLOW_RESTART_S")
SLOW_RANK = int(os.environ["LAUNCHER_TEST_SLOW_RANK"]) if os.environ.get("LAUNCHER_TEST_SLOW_RANK") else None
SAMPLE_LOG = os.environ.get("LAUNCHER_TEST_SAMPLE_LOG") or None
HANG = tuple(int(x) for x in os.environ.get("LAUNCHER_TEST_HANG", "").split(":") if x)


def slowed(rank: int, seconds: float) -> float:
    """``seconds`` (SLOW_STEP_S or SLOW_DATA_S) on the rank LAUNCHER_TEST_SLOW_RANK names, or every rank, else 0."""
    return seconds if SLOW_RANK is None or rank == SLOW_RANK else 0.0


def slow_restart(attempt: int) -> None:
    if attempt > 0:
        time.sleep(SLOW_RESTART_S)


def slow_save(_data: bytes) -> None:
    time.sleep(SLOW_SAVE_S)


def slow_data(trainer: Any) -> None:
    time.sleep(slowed(trainer.comm.rank, SLOW_DATA_S))


def maybe_hang(trainer: Any) -> None:
    if (trainer.comm.rank, trainer.step) == HANG and current_attempt() == 0:
        time.sleep(3600)


def slow_step(trainer: Any) -> None:
    time.sleep(slowed(trainer.comm.rank, SLOW_STEP_S))


def _log_line(rank: int, first: int, indices: list[int]) -> None:
    with open(Path(SAMPLE_LOG) / f"rank{rank}.txt", "a") as f:  # type: ignore[arg-type]
        f.write(f"{first} " + " ".join(map(str, indices)) + "\n")


def log_taken(loader: Any, indices: list[int]) -> None:
    """A batch the loop took: its epoch (the loader's position has moved past it already) and indices."""
    epoch = loader.epoch if loader.position else loader.epoch - 1
    _log_line(loader.rank, epoch, indices)


def log_online(trainer: Any) -> None:
    """mode=online: the step this batch trained and its records' numbers (an epoch's batches: log_taken)."""
    if trainer.cfg.mode == "online":
        _log_line(trainer.comm.rank, trainer.step, [r.index for r in trainer.source.batch])


if SAMPLE_LOG:  # first: a step's batch is logged before a hang or a pause after it, as it was trained
    hooks.batch_taken.append(log_taken)
    hooks.after_step.append(log_online)
if SLOW_RESTART_S:
    hooks.rank_start.append(slow_restart)
if SLOW_SAVE_S:
    hooks.checkpoint_write.append(slow_save)
if SLOW_DATA_S:
    hooks.before_forward.append(slow_data)
if HANG:  # before the step's pause: the order the trainer had them in
    hooks.after_step.append(maybe_hang)
if SLOW_STEP_S:
    hooks.after_step.append(slow_step)
