"""Stop and checkpoint on signals, with every rank agreeing on the step.

SIGTERM/SIGINT: checkpoint at the current step and stop. SIGUSR1 (what Slurm sends before
preemption): checkpoint now and keep training. A signal may reach ranks at different steps, so the
flags are all-reduced once per step and all ranks act on the same step; otherwise one rank would
save while another waits in the next step's allreduce.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch


@dataclass
class Requests:
    stop: bool = False
    save: bool = False


class SignalFlags:
    def __init__(self) -> None:
        self.stop_signal = 0
        self.save_pending = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_save)

    def _on_stop(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum

    def _on_save(self, _signum: int, _frame: object) -> None:
        self.save_pending = True

    def poll(self, comm: object) -> Requests:
        """What any rank was asked for since the last poll (a collective: every rank must call it)."""
        # take the flag before the all-reduce: Python runs a handler when the blocking call returns, and
        # a request that lands then must stay pending for the next poll, not be cleared after it
        save_pending, self.save_pending = self.save_pending, False
        local = torch.tensor([float(self.stop_signal > 0), float(save_pending)], device=comm.device)
        stop, save = (comm.allreduce_mean(local) > 0).tolist()  # type: ignore[attr-defined]
        return Requests(stop=stop, save=save)
