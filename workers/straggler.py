"""Straggler detection: name a rank whose own share of the step stays well above the other ranks'.

In synchronous data parallelism every rank's wall-clock step time is the same: the ranks wait for each
other in the gradient all-reduce. What differs is each rank's *local* share of the step, measured here with
``time.perf_counter`` from the end of the previous optimizer step to the start of backward: waiting for
the next batch (data loading), moving it to the device, forward and loss.

On CUDA this is host-side time: kernels run asynchronously, so the forward's share is mostly launch time.
It catches the usual causes of a straggler, an input pipeline that stalls (slow storage, too few
DataLoader workers, a busy host) and CPU-bound ranks, not a GPU that computes slowly.

Two cases leave out the forward: when it holds a collective (DDP broadcasting a model's buffers, such as
BatchNorm statistics, at the start of every forward), fast ranks wait there for the slow one and their
forward time would hide it, so only the data part is counted (see :func:`forward_waits`). In
``mode=online`` the batch arrives before the step, after the ranks' agreement (a collective), so the
local share is the forward alone.

Cost: two clock reads per micro-batch; at log steps one number per rank rides on the log step's
all-reduce (each rank's mean at its own place in a world-size vector of zeros: the sum is every rank's
mean), no collective of its own. Rank 0 compares each rank's mean over the log window with the median;
a rank above ``factor`` times the median (and more than :data:`MIN_GAP_S` above it, so that noise on
tiny steps does not count) for ``windows`` consecutive log windows is named once on the console — again
only after it recovered and fell behind anew — and TensorBoard gets ``straggler/max_ratio`` (the slowest
rank's ratio to the median), ``straggler/rank`` (the slowest rank), ``straggler/max_ms`` and
``straggler/median_ms`` at every log step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from workers.distributed.comm import Comm

MIN_GAP_S = 1e-3  # a rank must be this much slower than the median, besides the factor
MAX_LINES = 5  # ranks named per log step; more are counted in one line


def forward_waits(model: Any) -> bool:
    """Whether the wrapped model's training forward holds a collective: DDP broadcasting module buffers."""
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile
    will_sync = getattr(ddp, "will_sync_module_buffers", None)
    return bool(will_sync and will_sync())


def median(values: list[float]) -> float:
    """The lower median: in an even world the slower half's ranks are compared with the faster half's
    slowest (with 2 ranks, the slow rank with the other one, not with the mean of both)."""
    return sorted(values)[(len(values) - 1) // 2]


class StragglerDetector:
    """``add`` every step on every rank; at log steps, on every rank, ``local`` goes into the log step's all-reduce
    and ``check`` reads the sum. ``hosts``: each rank's host name, for the console line."""

    def __init__(self, factor: float, windows: int, model: Any = None,
                 say: Callable[[str], None] | None = None, hosts: list[str] | None = None) -> None:
        self.factor, self.windows = factor, windows
        self.count_forward = not forward_waits(model)
        self.say = say or (lambda line: tqdm.write(line, file=sys.stdout))  # keeps rank 0's progress bar intact
        self.local_s, self.steps = 0.0, 0  # this rank's, since the last check
        self.behind: list[int] = []  # rank 0: consecutive log windows each rank was above the threshold
        self.hosts: list[str] = hosts or []

    def add(self, data_s: float, forward_s: float) -> None:
        """One optimizer step's local time on this rank: waiting for and moving its batches, forward and loss."""
        self.local_s += data_s + forward_s if self.count_forward else data_s
        self.steps += 1

    def local(self, comm: Comm) -> list[float]:
        """At a log step: this rank's mean local step time over the window, at its place in a world-size vector of
        zeros, for the log step's all-reduce (comm.agree) to sum; starts the next window. Empty for one rank."""
        if comm.world_size == 1:
            return []
        times = [0.0] * comm.world_size
        times[comm.rank] = self.local_s / max(self.steps, 1)
        self.local_s, self.steps = 0.0, 0
        return times

    def check(self, comm: Comm, times: list[float]) -> dict[str, float]:
        """At a log step, with every rank's mean (the sum of :meth:`local`): rank 0 names stragglers and returns
        its TensorBoard scalars (other ranks, and a single rank, return {})."""
        if not times or not comm.is_main:
            return {}
        scalars, lines = self.judge(times)
        for line in lines:
            self.say(line)
        return scalars

    def judge(self, times: list[float]) -> tuple[dict[str, float], list[str]]:
        """Rank 0, one log window's mean local time per rank (seconds): (TensorBoard scalars, console lines)."""
        if len(self.behind) != len(times):
            self.behind = [0] * len(times)
        # a rank with no step in the window reported 0: under torchft a group out of the quorum, or healing
        mid = median([t for t in times if t > 0] or [0.0])
        slowest = max(range(len(times)), key=times.__getitem__)
        named = []
        for rank, t in enumerate(times):
            above = mid > 0 and t > self.factor * mid and t - mid > MIN_GAP_S
            self.behind[rank] = self.behind[rank] + 1 if above else 0
            if self.behind[rank] == self.windows:
                named.append(rank)
        ratio = [t / mid if mid > 0 else float("inf") for t in times]
        lines = [f"straggler: rank {r}{f' ({self.hosts[r]})' if r < len(self.hosts) else ''} local step time "
                 f"{times[r] * 1e3:.1f} ms is {ratio[r]:.1f}x the median {mid * 1e3:.1f} ms "
                 f"for {self.windows} log windows" for r in named[:MAX_LINES]]
        if len(named) > MAX_LINES:
            lines.append(f"straggler: and {len(named) - MAX_LINES} more rank(s)")
        scalars = {"straggler/max_ratio": ratio[slowest] if mid > 0 else 1.0, "straggler/rank": float(slowest),
                   "straggler/max_ms": times[slowest] * 1e3, "straggler/median_ms": mid * 1e3}
        return scalars, lines
