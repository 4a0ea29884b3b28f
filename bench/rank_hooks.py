"""The benchmarks' probes inside the ranks: hook callbacks (workers/hooks.py), each registered only when its
variable is set. ``python -m bench overhead`` starts its runs with ``LAUNCHER_HOOKS=bench.rank_hooks``
(bench/overhead_detail.py); the ranks import it from the checkout on their PYTHONPATH.

``LAUNCHER_PROFILE``           file: rank 0 runs its training loop under cProfile and writes the stats there
                               (``python -m bench overhead`` prints where a step's time goes).
``LAUNCHER_BENCH_INTERLEAVE``  file: before each training step, a step of the bare minimal loop
                               (bench/minimal_ddp.py) on the same model, both timed; rank 0 writes the times
                               there, so ``python -m bench overhead`` compares the two loops step by step in
                               the same process, without the noise between separate runs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from workers import hooks

PROFILE = os.environ.get("LAUNCHER_PROFILE") or None
INTERLEAVE = os.environ.get("LAUNCHER_BENCH_INTERLEAVE") or None
_profile: Any = None  # rank 0's cProfile.Profile while the loop runs
_bare: dict[str, Any] = {}  # the minimal loop's data, optimizer and step times (interleave)


def start_profile(trainer: Any) -> None:
    """Rank 0's cProfile of the training loop."""
    global _profile
    if trainer.comm.rank != 0:
        return
    import cProfile

    import torch.utils.tensorboard  # noqa: F401 -- a one-off of the first log step: not what a profile of steps is for

    _profile = cProfile.Profile()
    _profile.enable()


def save_profile(_trainer: Any) -> None:
    if _profile is not None:
        _profile.disable()
        _profile.dump_stats(PROFILE)


def interleave(trainer: Any) -> None:
    """At the top of every training-loop iteration: one step of bench/minimal_ddp.py's loop (its data, its own
    Adam) on the trainer's DDP model, timed, then the iteration's start on a clock that leaves the bare steps
    out. Every 20 iterations rank 0 rewrites the file: ``marks`` (the trainer's step n took marks[n] -
    marks[n-1]) and ``bare`` (each bare step's seconds), for ``bench overhead`` to compare the two loops'
    median steps, measured alternately in the same processes."""
    start = time.perf_counter()
    model, rank = trainer.model, trainer.comm.rank
    if "opt" not in _bare:
        import torch

        from bench import minimal_ddp

        x, y, order = minimal_ddp.data(rank, trainer.comm.world_size)
        _bare.update(one_step=minimal_ddp.one_step, x=x, y=y, order=order, marks=[], bare=[], excluded=0.0,
                     opt=torch.optim.Adam(model.parameters(), lr=3e-3))
    _bare["one_step"](model, _bare["opt"], _bare["x"], _bare["y"], _bare["order"], trainer.source.batch_size,
                      len(_bare["bare"]) + 1)
    _bare["bare"].append(time.perf_counter() - start)
    _bare["opt"].zero_grad()  # the trainer's step starts without gradients, as in its own loop
    if rank == 0 and len(_bare["bare"]) % 20 == 0:
        with open(INTERLEAVE, "w") as f:  # type: ignore[arg-type]
            json.dump({"marks": _bare["marks"], "bare": _bare["bare"]}, f)
    _bare["excluded"] += time.perf_counter() - start
    _bare["marks"].append(time.perf_counter() - _bare["excluded"])


if PROFILE:
    hooks.loop_start.append(start_profile)
    hooks.loop_end.append(save_profile)
if INTERLEAVE:
    hooks.before_step.append(interleave)
