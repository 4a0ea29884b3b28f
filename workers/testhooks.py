"""Test hooks, read from the environment once, here only. Off unless a test sets them.

``LAUNCHER_TEST_SLOW_SAVE_S``  seconds to pause on every write() into a checkpoint file, so a test
                               can kill rank 0 in the middle of a save.
``LAUNCHER_TEST_SLOW_STEP_S``  seconds to pause after every training step, so a test can act mid-run.
``LAUNCHER_TEST_SLOW_DATA_S``  seconds to pause before every micro-batch's forward, inside the rank's
                               measured local step time, as a slow input pipeline would (a straggler).
``LAUNCHER_TEST_SLOW_RESTART_S`` seconds a restarted rank (attempt > 0) pauses before it reports in, as slow imports
                               (a cold shared filesystem) would.
``LAUNCHER_TEST_SLOW_RANK``    a rank: the two pauses above apply on that rank only (unset: every rank).
``LAUNCHER_TEST_SAMPLE_LOG``   directory: each rank appends the dataset indices it trains on to
                               ``rank<R>.txt``, so a test can check which samples an epoch saw.
``LAUNCHER_TEST_HANG``         ``RANK:STEP``: that rank stops for an hour after that step, in the first
                               attempt only (a restart runs on), so a test can watch the hang detection.
``LAUNCHER_PROFILE``           file: rank 0 runs its training loop under cProfile and writes the stats there
                               (``python -m bench overhead`` prints where a step's time goes).
``LAUNCHER_BENCH_INTERLEAVE``  file: before each training step, a step of the bare minimal loop
                               (bench/minimal_ddp.py) on the same model, both timed; rank 0 writes the times
                               there, so ``python -m bench overhead`` compares the two loops step by step in
                               the same process, without the noise between separate runs.
"""

from __future__ import annotations

import os
import time
from typing import Any

SLOW_SAVE_S = float(os.environ.get("LAUNCHER_TEST_SLOW_SAVE_S", "0") or 0)
SLOW_STEP_S = float(os.environ.get("LAUNCHER_TEST_SLOW_STEP_S", "0") or 0)
SLOW_DATA_S = float(os.environ.get("LAUNCHER_TEST_SLOW_DATA_S", "0") or 0)
SLOW_RESTART_S = float(os.environ.get("LAUNCHER_TEST_SLOW_RESTART_S", "0") or 0)
SLOW_RANK = int(os.environ["LAUNCHER_TEST_SLOW_RANK"]) if os.environ.get("LAUNCHER_TEST_SLOW_RANK") else None
SAMPLE_LOG = os.environ.get("LAUNCHER_TEST_SAMPLE_LOG") or None
HANG = tuple(int(x) for x in os.environ.get("LAUNCHER_TEST_HANG", "").split(":") if x)
PROFILE = os.environ.get("LAUNCHER_PROFILE") or None
INTERLEAVE = os.environ.get("LAUNCHER_BENCH_INTERLEAVE") or None
_bare: dict[str, Any] = {}  # the minimal loop's data, optimizer and step times (interleave)


def slowed(rank: int, seconds: float) -> float:
    """``seconds`` (SLOW_STEP_S or SLOW_DATA_S) on the rank LAUNCHER_TEST_SLOW_RANK names, or every rank, else 0."""
    return seconds if SLOW_RANK is None or rank == SLOW_RANK else 0.0


def maybe_hang(rank: int, step: int, attempt: int) -> None:
    if (rank, step) == HANG and attempt == 0:
        time.sleep(3600)


def start_profile(rank: int) -> Any:
    """Rank 0's cProfile of the training loop when LAUNCHER_PROFILE is set, else None (no cost)."""
    if not PROFILE or rank != 0:
        return None
    import cProfile

    import torch.utils.tensorboard  # noqa: F401 -- a one-off of the first log step: not what a profile of steps is for

    profile = cProfile.Profile()
    profile.enable()
    return profile


def save_profile(profile: Any) -> None:
    if profile is not None:
        profile.disable()
        profile.dump_stats(PROFILE)


def interleave(model: Any, rank: int, world: int, batch: int) -> None:
    """LAUNCHER_BENCH_INTERLEAVE, at the top of every training-loop iteration: one step of bench/minimal_ddp.py's
    loop (its data, its own Adam) on the trainer's DDP model, timed, then the iteration's start on a clock that
    leaves the bare steps out. Every 20 iterations rank 0 rewrites the file: ``marks`` (the trainer's step n
    took marks[n] - marks[n-1]) and ``bare`` (each bare step's seconds), for ``bench overhead`` to compare the
    two loops' median steps, measured alternately in the same processes."""
    start = time.perf_counter()
    if "opt" not in _bare:
        import torch

        from bench import minimal_ddp  # a checkout's bench/, on the ranks' path (launcher/resources.py pythonpath)

        x, y, order = minimal_ddp.data(rank, world)
        _bare.update(one_step=minimal_ddp.one_step, x=x, y=y, order=order, marks=[], bare=[], excluded=0.0,
                     opt=torch.optim.Adam(model.parameters(), lr=3e-3))
    _bare["one_step"](model, _bare["opt"], _bare["x"], _bare["y"], _bare["order"], batch, len(_bare["bare"]) + 1)
    _bare["bare"].append(time.perf_counter() - start)
    _bare["opt"].zero_grad()  # the trainer's step starts without gradients, as in its own loop
    if rank == 0 and len(_bare["bare"]) % 20 == 0:
        import json

        with open(INTERLEAVE, "w") as f:  # type: ignore[arg-type]
            json.dump({"marks": _bare["marks"], "bare": _bare["bare"]}, f)
    _bare["excluded"] += time.perf_counter() - start
    _bare["marks"].append(time.perf_counter() - _bare["excluded"])
