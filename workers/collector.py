"""Python's garbage collector kept out of the training steps (torchtitan's recipe)."""

from __future__ import annotations

import gc
import os

GC_EVERY = 200  # steps between (young-generation) garbage collections while training; paused otherwise

_fork_hooked = False


def pause() -> None:
    """What set-up made — modules, model, dataset, hundreds of thousands of objects — moves to the permanent
    generation, and the young generations are collected every GC_EVERY steps (:func:`collect`) instead of
    whenever allocations cross a threshold (a full collection would scan everything made since, the TensorBoard
    import at the first log step among it: tens of ms). Startup's own garbage, if any, stays: a full collection
    first would cost a large fraction of a second before the first step."""
    global _fork_hooked
    gc.freeze()
    gc.disable()
    if not _fork_hooked:  # DataLoader workers forked from here run on their own: with the collector on
        os.register_at_fork(after_in_child=gc.enable)
        _fork_hooked = True


def collect(step: int) -> None:
    if step % GC_EVERY == 0:
        gc.collect(1)  # the young generations: what the last steps made


def resume() -> None:
    gc.unfreeze()
    gc.enable()
