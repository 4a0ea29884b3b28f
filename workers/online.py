"""Online (streaming) training: the model learns from records as they arrive, each record once.

``mode=online`` swaps the trainer's source of batches (workers/trainer.py runs the same loop): each
step every rank takes its next ``online.batch_size`` records of the stream (workers/data/stream.py).
The training forward pass scores them before the update, which gives the prequential
(test-then-train) loss and accuracy for free; gradients are averaged across ranks as usual.

Ranks move in lockstep: before each step they agree (one small all-reduce) on whether everyone has a
batch, whether a stop/save signal arrived, whether a wall-time checkpoint is due and whether the
stream went silent past ``online.idle_timeout_s`` — then they train, wait a little longer, save, or
checkpoint and end together. Checkpoints hold every rank's stream position, so a restarted run
continues with the first record not yet trained.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from workers.data.stream import Position, Record, StreamReader, resume_point
from workers.sources import STOP_SIGNAL, Turn

if TYPE_CHECKING:
    from workers.config import OnlineConfig
    from workers.distributed.comm import Comm
    from workers.signals import SignalFlags


class StreamSource:
    """The trainer's batches from a stream; its state is every rank's stream position."""

    name = "online"
    finish_on_stop = True  # a stop or a silent stream still ends with a checkpoint, an evaluation and result.json

    def __init__(self, online: OnlineConfig, comm: Comm, signals: SignalFlags, seed: int) -> None:
        self.o, self.comm, self.signals, self.seed = online, comm, signals, seed
        self.batch_size = self.o.batch_size
        self.records = 0  # records trained, all ranks
        self.committed = Position()  # this rank's stream position after its last trained record
        self.positions: list[dict] | None = None  # every rank's, gathered for the next checkpoint
        self.resume_from: list[dict] | None = None
        self.batch: list[Record] = []
        self.after = Position()
        # this rank's last outcomes and losses, for the rolling prequential metrics
        self.window: deque[float] = deque(maxlen=max(1, self.o.window // self.comm.world_size))
        self.window_loss: deque[float] = deque(maxlen=self.window.maxlen)
        self.seen = self.correct = 0.0  # this rank's, since the start of this run
        self.last_save = time.monotonic()

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"records": self.records, "stream": {"world_size": self.comm.world_size, "positions": self.positions}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = state.get("records", 0)
        self.resume_from = (state.get("stream") or {}).get("positions")

    def before_save(self) -> None:
        """Every rank's stream position for rank 0's checkpoint (a collective)."""
        self.positions = self.comm.allgather_object(self.committed.to_dict())
        self.last_save = time.monotonic()

    # -- batches -----------------------------------------------------------------------------
    def start(self, step: int) -> None:
        comm = self.comm
        start, skip = Position(), (lambda _index: False)
        if self.resume_from:
            start, skip = resume_point(self.resume_from, comm.world_size, comm.rank)
            if comm.is_main:
                where = f", {start.shard or self.o.path} byte {start.offset}" if self.o.source != "synthetic" else ""
                print(f"resuming the stream after {self.records} records (rank 0 at line {start.line}{where})",
                      flush=True)
        self.committed = start
        self.reader = StreamReader(self.o, self.o.features, self.o.classes, comm.rank, comm.world_size, start, skip,
                                   self.seed)

    def next(self, step: int) -> Turn:
        """Agree with the other ranks on this turn: train, wait for records, save, or stop."""
        reader, signals = self.reader, self.signals
        has_batch = reader.fill(self.o.poll_s)
        clock_due = self.comm.is_main and 0 < self.o.checkpoint_every_s < time.monotonic() - self.last_save
        local = torch.tensor([signals.stop_signal > 0, signals.take_save_request(), not has_batch,
                              reader.idle() and not has_batch, clock_due], dtype=torch.float32, device=self.comm.device)
        stop, save, missing, idle, due = (self.comm.allreduce_mean(local) > 0).tolist()
        if save:
            signals.mark_saved()
        if stop or idle:
            why = (STOP_SIGNAL if stop else "the stream ended" if reader.finished()
                   else f"the stream was silent for {self.o.idle_timeout_s:g}s")
            return Turn(stop=True, ended=why)
        if missing:  # someone's batch is not complete yet: wait together (saving first if asked)
            return Turn(save=save or due)
        self.batch, self.after = reader.take()
        dev = self.comm.device
        x = torch.tensor([r.x for r in self.batch], dtype=torch.float32, device=dev)
        y = torch.tensor([r.y for r in self.batch], dtype=torch.long, device=dev)
        return Turn(batches=[(x, y)], save=save or due)

    def trained(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """After the step: the prequential outcome of each record (scored before the update), the new position."""
        outputs = outputs.detach()
        losses = F.cross_entropy(outputs.float(), targets, reduction="none")
        hits = (outputs.argmax(1) == targets).float()
        self.committed = self.after
        self.window_loss.extend(losses.tolist())
        self.window.extend(hits.tolist())
        self.records += len(self.batch) * self.comm.world_size
        self.seen, self.correct = self.seen + len(self.batch), self.correct + hits.sum().item()

    # -- metrics -----------------------------------------------------------------------------
    def log_values(self, step: int) -> list[float]:
        """This rank's window and run totals, summed over the ranks in the log step's all-reduce (comm.agree)."""
        return [sum(self.window_loss), sum(self.window), len(self.window), self.correct, self.seen, self.reader.bad]

    def log(self, sums: list[float], step: int) -> dict[str, float]:
        """The rolling prequential metrics over all ranks, from the sums of :meth:`log_values`."""
        win_loss, win_hits, win_n, hits, n, bad = sums
        return {"online/prequential_loss": win_loss / max(win_n, 1),
                "online/prequential_accuracy": win_hits / max(win_n, 1),
                "online/prequential_accuracy_run": hits / max(n, 1), "online/records": self.records,
                "online/bad_records": bad}

    def _sum(self, *values: float) -> list[float]:
        """Each value summed over the ranks (one all-reduce)."""
        total = self.comm.allreduce_mean(torch.tensor(values, dtype=torch.float64, device=self.comm.device))
        return (total * self.comm.world_size).tolist()

    def summary(self, ended: str, result: dict[str, float], step: int) -> tuple[dict[str, float], str]:
        """The end of the run (a collective): totals for result.json, and the closing line."""
        hits, n, bad = self._sum(self.correct, self.seen, self.reader.bad)
        accuracy = hits / max(n, 1)
        result = {**result, "online/prequential_accuracy_run": accuracy, "online/bad_records": bad,
                  "online/records": self.records}
        return result, (f"online: ended ({ended}) at step {step} after {self.records} records; "
                        f"prequential accuracy {accuracy:.4f}, {int(bad)} bad records; "
                        f"test accuracy {result.get('test/accuracy', float('nan')):.4f}")
