"""Metrics: the default loss and accuracy; what rank 0 reports: TensorBoard (a no-op logger elsewhere, decided
once), the progress bar, a restart's record."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from workers import contract
from workers.contract import failure

if TYPE_CHECKING:
    from tqdm import tqdm


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dim: (B, classes) with (B,) targets, or a language model's (B, T, vocab)
    with (B, T) targets. Computed in fp32 whatever the autocast dtype."""
    if outputs.dim() > 2:  # the checks cost less than the calls they skip on the common (B, classes) fp32 path
        outputs, targets = outputs.flatten(0, -2), targets.flatten()
    return F.cross_entropy(outputs if outputs.dtype == torch.float32 else outputs.float(), targets)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Share of argmax predictions equal to the targets; None (not reported) unless the targets are class
    indices with one output per class."""
    if targets.is_floating_point() or outputs.dim() != targets.dim() + 1:
        return None
    return (outputs.argmax(-1) == targets).float().mean()


class MetricsLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Rank 0's TensorBoard writer, opened at the first scalar: importing tensorboard takes a few hundred
    milliseconds that need not stand between the launch and the first training step."""

    def __init__(self, log_dir: Path, resume_step: int) -> None:
        self.log_dir, self.resume_step = log_dir, resume_step
        self._writer: Any = None

    @property
    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events past the resumed step, so a resumed run continues the same curves
            # without duplicated steps
            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.resume_step + 1 if self.resume_step
                                         else None)
        return self._writer

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        self.writer.add_hparams(hparams, metrics, run_name="hparams")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class GatedLogger:
    """Writes only while ``gate()`` says so: under torchft, "rank 0" is whichever group leads the quorum now."""

    def __init__(self, inner: MetricsLogger, gate: Callable[[], bool]) -> None:
        self.inner, self.gate = inner, gate

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.gate():
            self.inner.log(metrics, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.gate():
            self.inner.hparams(hparams, metrics)

    def close(self) -> None:
        self.inner.close()


def build_logger(is_main: bool, log_dir: Path, resume_step: int,
                 gate: Callable[[], bool] | None = None) -> MetricsLogger:
    if gate is not None:
        return GatedLogger(TensorBoardLogger(log_dir, resume_step), gate)
    return TensorBoardLogger(log_dir, resume_step) if is_main else NullLogger()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become strings (TensorBoard hparams take scalars)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


class _Lines:
    """tqdm target for pipes and log files: one line per refresh instead of carriage returns."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int | None, initial: int, enabled: bool, desc: str) -> tqdm:
    """tqdm on rank 0: redrawn in place on a terminal, a line every few seconds in a log."""
    from tqdm import tqdm

    tty = sys.stdout.isatty()
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                file=sys.stdout if tty else _Lines(sys.stdout), mininterval=1.0 if tty else 5.0,
                ascii=not tty, ncols=None if tty else 100)


def recovery(run_dir: Path, attempt: int) -> dict[str, float]:
    """TensorBoard's record of a restart: its number and the seconds from the failure to this first step."""
    out = {"restarts/count": float(attempt)}
    failed = failure.read(contract.failure_file(contract.attempt_dir(run_dir, attempt - 1)))
    if failed is not None:  # the launcher writes it; a bare torchrun does not
        out["restarts/recovery_s"] = time.time() - failed.at
    return out
