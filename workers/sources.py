"""Where the trainer's batches come from, turn by turn: epochs over a dataset, or a stream (workers/online.py).

Before each step the loop asks its source for a :class:`Turn`: the micro-batches to train, or none
this turn (a stream waiting for records); whether to checkpoint now; whether to stop. A source also
owns its part of the checkpoint (the loader position, or every rank's stream position), adds its own
metrics at log steps, and writes the closing line. Both sources share one interface:
``name``, ``batch_size``, ``finish_on_stop``, ``start``, ``next``, ``trained``, ``before_save``,
``state_dict``/``load_state_dict``, ``log_values``/``log`` and ``summary`` (EpochSource also ``restart``s after
a torchft heal or a Horovod Elastic reset). A source is built from what it uses
(loader or stream config, comm, signal flags), not from the trainer: the loop passes the step.

A log step makes one all-reduce (comm.agree): the loss, and the source's ``log_values()`` summed
over the ranks, which ``log(sums)`` turns into TensorBoard scalars (and, in batch mode, into the
stop/save requests that ride on it).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from workers.signals import Requests, SignalFlags

if TYPE_CHECKING:
    from workers.data.loader import TrainLoader
    from workers.distributed.comm import Comm

SIGNAL_POLL_EVERY = 10  # steps between checks for stop/save requests until the first log step measured a step
SIGNAL_POLL_S = 1.0  # then: ranks agree on requests at least about this often (log steps, else a poll of its own)
STOP_SIGNAL = "a stop signal"


@dataclass
class Turn:
    """What the source says before each step."""

    batches: Iterable[Any] | None = None  # the step's micro-batches, or None: no step this turn
    save: bool = False  # checkpoint now (a signal, a wall-time interval)
    stop: bool = False  # checkpoint and leave the loop
    ended: str = ""  # why it stops, for the closing line


class EpochSource:
    """Batch training: epochs over the dataset through the resumable loader. Stop/save requests are agreed on
    in the log step's all-reduce; when log steps are more than about SIGNAL_POLL_S apart, a small all-reduce of
    their own comes in between, so a signal is honoured within about a second whatever ``log_every`` is."""

    name = "train"
    finish_on_stop = False  # a stop signal saves and exits at once: the run resumes later

    def __init__(self, loader: TrainLoader, comm: Comm, signals: SignalFlags, accum: int) -> None:
        # loader: replaced when a reset re-shards the data (state.reposition)
        self.loader, self.comm, self.signals, self.accum = loader, comm, signals, accum
        self.batch_size = loader.batch_size
        self.asked = Requests()  # what the ranks agreed on at the last log step, acted on at the next turn
        self.poll_every = SIGNAL_POLL_EVERY  # steps between agreements, the same on every rank
        self.agreed_at = 0  # the step of the last agreement (log step or poll)
        self.window_at, self.window_step = time.monotonic(), 0  # the log window's start, for poll_every

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def start(self, step: int) -> None:
        loader = self.loader
        if step and self.comm.is_main:
            print(f"resuming from step {step} (epoch {loader.epoch}, sample {loader.position})", flush=True)
        self.data = iter(self.loader)  # its batches from its position on
        self.agreed_at = self.window_step = step
        self.window_at = time.monotonic()

    def restart(self, step: int) -> None:
        """After the position changed under a running loop (a torchft heal): batches from the new position."""
        self.data = iter(self.loader)
        self.agreed_at = self.window_step = step

    def next(self, step: int) -> Turn:
        asked = self.asked
        # no log step for a while: a poll (a collective) of its own, where the comm allows it (not where a rank can
        # start mid-window: every rank must make the same collectives)
        if step - self.agreed_at >= self.poll_every and self.comm.signal_polls:
            asked, self.agreed_at = self.signals.poll(self.comm), step
        self.asked = Requests()
        return Turn(batches=itertools.islice(self.data, self.accum), save=asked.save, stop=asked.stop,
                    ended=STOP_SIGNAL)

    def before_save(self) -> None:
        pass

    def trained(self, outputs: torch.Tensor, targets: Any) -> None:
        pass

    def log_values(self, step: int) -> list[float]:
        """This rank's stop/save flags and, from rank 0 only (so the sum is its number, exactly, on every rank),
        how many steps take about SIGNAL_POLL_S: the poll interval until the next log step."""
        now = time.monotonic()
        proposal = 0.0
        if self.comm.is_main and now > self.window_at:
            proposal = float(max(1, int(SIGNAL_POLL_S * (step - self.window_step) / (now - self.window_at))))
        self.window_at, self.window_step = now, step
        return [*self.signals.local(), proposal]

    def log(self, sums: list[float], step: int) -> dict[str, float]:
        stop, save, proposal = sums
        self.asked, self.agreed_at = self.signals.agreed(stop, save), step
        self.poll_every = max(1, round(proposal))
        return {"train/epoch": self.loader.epoch}

    def summary(self, ended: str, result: dict[str, float], step: int) -> tuple[dict[str, float], str]:
        shown = ", ".join(f"{k.replace('/', ' ')} {v:.4f}" for k, v in result.items()) or "no eval split"
        return result, f"step {step}: {shown}"
