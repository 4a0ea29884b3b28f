"""Stop and checkpoint on signals, with every rank agreeing on the step.

SIGTERM/SIGINT: checkpoint at the current step and stop. SIGUSR1 (what Slurm sends before
preemption): checkpoint now and keep training. A signal may reach ranks at different steps, so the
flags are all-reduced and all ranks act on the same step; otherwise one rank would save while
another waits in the next step's allreduce. The flags ride on an all-reduce the loop makes anyway
(a log step's, an online turn's) where they can (:meth:`SignalFlags.local`, :meth:`SignalFlags.agreed`),
or :meth:`SignalFlags.poll` makes one of its own.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

import torch


@dataclass
class Requests:
    stop: bool = False
    save: bool = False


# A SIGUSR1 reaching a rank this soon after a save it asked for is the same request: the launcher signals
# every rank, and one rank may see it a moment after the others already agreed to save.
SAME_REQUEST_S = 1.0
STOP_RECEIVED = False  # whether a stop signal came at all (workers/rank.py: no waiting for one after a failure)


class SignalFlags:
    def __init__(self) -> None:
        self.stop_signal = 0
        self.save_pending = False
        self.save_asked_at = 0.0  # when the pending SIGUSR1 arrived
        self.saved_at = float("-inf")  # when the ranks last agreed to save
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_save)

    def _on_stop(self, signum: int, _frame: object) -> None:
        global STOP_RECEIVED
        self.stop_signal, STOP_RECEIVED = signum, True

    def _on_save(self, _signum: int, _frame: object) -> None:
        self.save_pending, self.save_asked_at = True, time.monotonic()

    def poll(self, comm: object) -> Requests:
        """What any rank was asked for since the last poll (a collective: every rank must call it)."""
        local = torch.tensor(self.local(), device=comm.device)  # type: ignore[attr-defined]
        return self.agreed(*(comm.allreduce_mean(local) > 0).tolist())  # type: ignore[attr-defined]

    def local(self) -> list[float]:
        """This rank's (stop, save) flags for an all-reduce; whatever of them is > 0 after it: :meth:`agreed`."""
        # take the flag before the all-reduce: Python runs a handler when the blocking call returns, and
        # a request that lands then must stay pending for the next poll, not be cleared after it
        # (take_save_request), unless the save just agreed on serves it
        return [float(self.stop_signal > 0), float(self.take_save_request())]

    def agreed(self, stop: float, save: float) -> Requests:
        """The requests, from the all-reduced flags of :meth:`local` (the same on every rank)."""
        if save > 0:
            self.mark_saved()
        return Requests(stop=stop > 0, save=save > 0)

    def take_save_request(self) -> bool:
        """This rank's pending SIGUSR1, cleared; one that the last agreed save already served counts not."""
        pending, self.save_pending = self.save_pending, False
        return pending and self.save_asked_at > self.saved_at + SAME_REQUEST_S

    def mark_saved(self) -> None:
        """The ranks agreed to save now."""
        self.saved_at = time.monotonic()
