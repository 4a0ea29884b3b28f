"""What of a trainer a checkpoint, a torchft heal and a Horovod Elastic commit hold, and putting it back.

Functions of the :class:`~workers.trainer.Trainer` they read and set: the weights (its bare module), the
optimizer, the step, the source's data position, the generators, the fp16 scaler, torchft's Manager state.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import torch

from workers import checkpoint as ck
from workers import task
from workers.config import to_dict
from workers.data.loader import TrainLoader, loader_kwargs
from workers.sources import EpochSource

if TYPE_CHECKING:
    from workers.trainer import Trainer

SCALER = "grad_scaler"  # checkpoint key of the fp16 GradScaler's state
FT_STATE = "torchft"  # checkpoint key of torchft's Manager state (--fault-tolerant)


def checkpoint_state(tr: Trainer) -> dict[str, Any]:
    comm = tr.comm
    state = {
        ck.MODEL: tr.net.state_dict(),
        ck.OPTIMIZER: tr.optimizer.state_dict(),
        ck.TRAIN_STATE: {"step": tr.step, **tr.source.state_dict()},
        ck.RNG: {"torch": torch.get_rng_state(), "python": random.getstate(),
                 # dropout on the GPU draws from the device's generator: an exact resume needs it too
                 **({"cuda": torch.cuda.get_rng_state(comm.device)} if comm.device.type == "cuda" else {})},
        ck.CONFIG: to_dict(tr.cfg),
    }
    if tr.scaler is not None:
        state[SCALER] = tr.scaler.state_dict()
    if comm.name == "torchft":  # the Manager's state: a whole-job restart resumes it from disk
        state[FT_STATE] = comm.state_dict()
    return state


def restore(tr: Trainer, state: dict[str, Any]) -> None:
    tr.net.load_state_dict(state[ck.MODEL])
    tr.optimizer.load_state_dict(state[ck.OPTIMIZER])
    tr.step = tr.saved_step = state[ck.TRAIN_STATE]["step"]
    tr.source.load_state_dict(state[ck.TRAIN_STATE])
    if tr.scaler is not None and SCALER in state:
        tr.scaler.load_state_dict(state[SCALER])
    if tr.comm.is_main:  # other ranks are re-seeded deterministically (Trainer.prepare); rank 0 continues exactly
        torch.set_rng_state(state[ck.RNG]["torch"])
        random.setstate(state[ck.RNG]["python"])
        if "cuda" in state[ck.RNG] and tr.comm.device.type == "cuda":
            torch.cuda.set_rng_state(state[ck.RNG]["cuda"], tr.comm.device)


def heal_state(tr: Trainer) -> dict[str, Any]:
    """torchft: the state a healing group receives from a live peer."""
    return {"step": tr.step, ck.MODEL: tr.net.state_dict(), ck.OPTIMIZER: tr.optimizer.state_dict(),
            ck.TRAIN_STATE: tr.source.state_dict()}


def load_healed(tr: Trainer, state: dict[str, Any]) -> None:
    """Take a live peer's state: its weights, optimizer and step, and the data position that goes with it (the
    batches this group would have trained in the steps it missed are skipped: workers/distributed/ft.py counts)."""
    tr.net.load_state_dict(state[ck.MODEL])
    tr.optimizer.load_state_dict(state[ck.OPTIMIZER])
    reposition(tr, int(state["step"]), state[ck.TRAIN_STATE])


def position(tr: Trainer) -> tuple[int, dict[str, Any], int]:
    """(step, data position, newest checkpoint's step): what Horovod Elastic commits beside the weights and the
    optimizer."""
    return tr.step, tr.source.state_dict(), tr.saved_step


def reposition(tr: Trainer, step: int, train_state: dict[str, Any], saved_step: int | None = None) -> None:
    """Go on from ``step`` at the data position ``train_state``, after a heal (torchft) or an elastic reset
    (Horovod), whose world may have another size: the loader re-shards the rest of the epoch for this rank.
    ``saved_step`` (Horovod Elastic: rank 0's) makes every rank agree on which step is on disk already."""
    comm, loader = tr.comm, tr.loader
    if (loader.rank, loader.world_size) != (comm.rank, comm.world_size):
        loader.close()
        tr.loader = TrainLoader(loader.dataset, loader.batch_size, comm.world_size, comm.rank, tr.cfg.seed,
                                comm.device, loader_kwargs(tr.cfg.data, comm.device), tr.channels_last)
        if isinstance(tr.source, EpochSource):  # it reads the position from the loader
            tr.source.loader = tr.loader
    tr.peak = task.peak_lr(tr.cfg, comm.world_size)  # scale_lr_with_world_size follows the new size
    tr.source.load_state_dict(train_state)
    tr.step = step
    if saved_step is not None:
        tr.saved_step = saved_step
    tr.source.restart(step)
