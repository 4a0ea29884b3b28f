"""Hook points: where code from outside the product (the tests' knobs, the benches' probes, your own) runs inside
a rank, without the product knowing whose it is.

    LAUNCHER_HOOKS=pkg.module[,pkg.other]

names modules each rank imports once, at its start (workers/rank.py, before the program runs). Importing one
registers its callbacks: ``hooks.after_step.append(fn)``. The ranks import from their PYTHONPATH, which holds
the checkout the launcher runs from (launcher/resources.py); the ssh fan-out and Slurm pass the variable on
like every other LAUNCHER_* one. Unset, every point is an empty list and each call site tests it first
(``if hooks.after_step: hooks.after_step(trainer)``): a rank without hooks pays one truth test per point.

The points, with the arguments their callbacks get:

``rank_start(attempt)``           a rank's start, before it reports in to the launcher (0: the first attempt)
``loop_start(trainer)``           the training loop is about to run (again after a Horovod Elastic reset)
``before_step(trainer)``          the top of every loop iteration, before the step's batches are asked for
``before_forward(trainer)``       each micro-batch, once it is here, before its forward pass; time spent in it
                                  counts as waiting for data (the straggler detector's local step time)
``after_step(trainer)``           after each optimizer step (``trainer.step``: the step just done)
``loop_end(trainer)``             the loop is over, however it ended, before the closing checkpoint
``batch_taken(loader, indices)``  the loop took a batch from a TrainLoader: its dataset indices, in order
``checkpoint_write(data)``        every write of bytes into a checkpoint file (rank 0, on the saving thread)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from workers import contract

VAR = contract.HOOKS_ENV


class Hook(list[Callable[..., None]]):
    """One hook point: its callbacks, called in the order they were added. False while it has none."""

    def __call__(self, *args: Any) -> None:
        for callback in self:
            callback(*args)


rank_start = Hook()
loop_start = Hook()
before_step = Hook()
before_forward = Hook()
after_step = Hook()
loop_end = Hook()
batch_taken = Hook()
checkpoint_write = Hook()


def load(environ: Mapping[str, str]) -> None:
    """Import the modules ``LAUNCHER_HOOKS`` names (Python imports each once per process)."""
    for name in filter(None, (n.strip() for n in environ.get(VAR, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{VAR} names {name!r}, which does not import here ({e}). HINT: the module must be "
                              f"on the ranks' PYTHONPATH; unset {VAR} to run without it") from e
