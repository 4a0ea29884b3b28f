"""Backends wing: each turns a LaunchPlan into commands, behind one small interface (:class:`Backend`, here):
torchrun.py, torchft.py (``--fault-tolerant`` on torchrun), horovodrun.py (with Horovod Elastic), mpirun.py.

May import: launcher.plan (types, ssh), launcher.errors, launcher.supervise.procs, workers.contract."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Protocol

from launcher.errors import UsageError
from launcher.plan.types import Cmd, LaunchPlan


class Backend(Protocol):
    name: str

    def build_commands(self, plan: LaunchPlan) -> list[Cmd]:
        """Pure: the argv lists (and env additions) that start this node's part of the job."""
        ...

    def check_available(self) -> str | None:
        """None when this machine can run the backend, else a one-line error with the fix."""
        ...

    def rank_log(self, plan: LaunchPlan, rank: int) -> Path | None:
        """Where this backend's runner writes the rank's stderr in the plan's attempt (None: the rank's own
        exit record says, as under torchrun)."""
        ...


def runner(name: str, python: str) -> str:
    """The runner (horovodrun, mpirun) to start: the one beside the Python that runs the ranks — a venv's own,
    also when the venv is not activated — else ``name``, found on PATH when it starts."""
    beside = Path(python).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else name


def find_runner(name: str, python: str | None = None) -> str | None:
    """Where :func:`runner` will find it (``python``: this interpreter by default); None if nowhere."""
    return shutil.which(runner(name, python or sys.executable))


def _registry() -> dict[str, Backend]:
    from launcher.backends.horovodrun import HorovodBackend
    from launcher.backends.mpirun import MpirunBackend
    from launcher.backends.torchrun import TorchrunBackend

    return {b.name: b for b in (TorchrunBackend(), HorovodBackend(), MpirunBackend())}


def backend_names() -> list[str]:
    return sorted(_registry())


def get_backend(name: str) -> Backend:
    registry = _registry()
    if name not in registry:
        raise UsageError(f"unknown backend {name!r}: choose one of {', '.join(sorted(registry))}")
    return registry[name]
