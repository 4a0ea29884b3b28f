"""Metrics: TensorBoard on rank 0, a no-op logger everywhere else (decided once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


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
    def __init__(self, log_dir: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the resumed step, so a resumed run continues the same curves
        # without duplicated steps
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        self.writer.add_hparams(hparams, metrics, run_name="hparams")

    def close(self) -> None:
        self.writer.close()


def build_logger(is_main: bool, log_dir: Path, resume_step: int) -> MetricsLogger:
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
