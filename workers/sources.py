"""Where the trainer's batches come from, turn by turn: epochs over a dataset, or a stream (workers/online.py).

Before each step the loop asks its source for a :class:`Turn`: the micro-batches to train, or none
this turn (a stream waiting for records); whether to checkpoint now; whether to stop. A source also
owns its part of the checkpoint (the loader position, or every rank's stream position), adds its own
metrics at log steps, and writes the closing line. Both sources share one interface:
``name``, ``batch_size``, ``finish_on_stop``, ``start``, ``next``, ``trained``, ``before_save``,
``state_dict``/``load_state_dict``, ``log`` and ``summary``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from workers.signals import Requests

if TYPE_CHECKING:
    from workers.trainer import Trainer

SIGNAL_POLL_EVERY = 10  # steps between checks for stop/save requests
STOP_SIGNAL = "a stop signal"


@dataclass
class Turn:
    """What the source says before each step."""

    batches: Iterable[Any] | None = None  # the step's micro-batches, or None: no step this turn
    save: bool = False  # checkpoint now (a signal, a wall-time interval)
    stop: bool = False  # checkpoint and leave the loop
    ended: str = ""  # why it stops, for the closing line


class EpochSource:
    """Batch training: epochs over the dataset through the resumable loader; signals polled every few steps."""

    name = "train"
    finish_on_stop = False  # a stop signal saves and exits at once: the run resumes later

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.batch_size = int(trainer.cfg.data["batch_size"])

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.loader.load_state_dict(state)

    def start(self) -> None:
        loader = self.trainer.loader
        if self.trainer.step and self.trainer.comm.is_main:
            print(f"resuming from step {self.trainer.step} (epoch {loader.epoch}, sample {loader.position})",
                  flush=True)
        self.data = self.trainer.batches()

    def next(self, step: int) -> Turn:
        # a collective: polling every SIGNAL_POLL_EVERY steps keeps its cost off the step time, and a stop or
        # save still lands within those few steps of the signal
        trainer = self.trainer
        asked = trainer.signals.poll(trainer.comm) if step % SIGNAL_POLL_EVERY == 0 else Requests()
        return Turn(batches=itertools.islice(self.data, trainer.cfg.trainer.grad_accum_steps), save=asked.save,
                    stop=asked.stop, ended=STOP_SIGNAL)

    def before_save(self) -> None:
        pass

    def trained(self, outputs: torch.Tensor, targets: Any) -> None:
        pass

    def log(self) -> dict[str, float]:
        return {"train/epoch": self.trainer.loader.epoch}

    def summary(self, ended: str, result: dict[str, float]) -> tuple[dict[str, float], str]:
        shown = ", ".join(f"{k.replace('/', ' ')} {v:.4f}" for k, v in result.items()) or "no eval split"
        return result, f"step {self.trainer.step}: {shown}"
