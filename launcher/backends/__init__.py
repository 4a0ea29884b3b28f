"""Backends turn a LaunchPlan into commands. One small interface, one file per backend."""

from __future__ import annotations

from typing import Protocol

from launcher.errors import UsageError
from launcher.plan import Cmd, LaunchPlan


class Backend(Protocol):
    name: str

    def build_commands(self, plan: LaunchPlan) -> list[Cmd]:
        """Pure: the argv lists (and env additions) that start this node's part of the job."""
        ...

    def check_available(self) -> str | None:
        """None when this machine can run the backend, else a one-line error with the fix."""
        ...


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
