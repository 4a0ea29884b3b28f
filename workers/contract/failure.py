"""The failure record: ``RUN_DIR/failure.json`` and ``RUN_DIR/attempts/<N>/failure.json``.

The launcher builds it (launcher/supervise/watch.py) from the ranks' exit and progress records and reads it to
decide on restarts (launcher/supervise/job.py, supervisor.py); the trainer reads its ``at`` to measure recovery;
benchmarks and tests read the file. The JSON keys are the field names: an exit or signal record carries the
``EXIT_ONLY`` keys, a hang the ``HANG_ONLY`` ones, and the keys the launcher adds later only once set.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from workers.files import write_json

HANG = "hang"
EXIT_ONLY = ("local_rank", "note", "error_file", "log", "log_tail")
HANG_ONLY = ("stalled_s", "timeout_s", "stacks")
ADDED_LATER = ("restarts_before", "recovered_after_s")


@dataclass(kw_only=True)
class Failure:
    """One attempt's first failure: the rank that failed first (or hung), where, how, and what it said."""

    attempt: int
    reason: str  # "exit" (a non-zero exit code), "signal" (killed by one) or "hang"
    rank: int
    exit_code: int  # the launcher's exit status for it (a hang's: HANG_EXIT_CODE)
    at: float  # wall time of the failure
    host: str | None = None  # as the rank named itself (the hostfile's name)
    pid: int | None = None
    signal: str | None = None  # "SIGKILL"...
    phase: str | None = None  # the rank's last reported phase (workers.contract.PHASES)
    step: int | None = None
    first_step_reached: bool = False  # a rank of the attempt finished a step: a restart can get further
    traceback: list[str] = field(default_factory=list)
    # exit and signal: every failed rank's {rank, exit_code, signal, peer_failed};
    # hang: every rank's {rank, host, phase, step, stalled_s}
    ranks: list[dict[str, Any]] = field(default_factory=list)
    # exit and signal only
    local_rank: int | None = None
    note: str | None = None
    error_file: str | None = None  # the rank's traceback in torchrun's error-file format
    log: str | None = None
    log_tail: list[str] = field(default_factory=list)
    # hang only
    stalled_s: float | None = None
    timeout_s: float | None = None
    stacks: str | None = None  # the folder holding every rank's rank<R>.stacks
    # the launcher adds these once it knows them
    restarts_before: int | None = None  # set when the attempt is concluded: the attempt number
    recovered_after_s: float | None = None  # from the failure to the next attempt's first step

    @property
    def hang(self) -> bool:
        return self.reason == HANG

    def to_json(self) -> dict[str, Any]:
        """The record as written to failure.json (the other reason's keys and unset later ones left out)."""
        skip = set(EXIT_ONLY if self.hang else HANG_ONLY)
        skip |= {k for k in ADDED_LATER if getattr(self, k) is None}
        return {k: v for k, v in asdict(self).items() if k not in skip}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Failure:
        """A record read back (keys it does not know are ignored: a newer launcher's)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> None:
        """Atomically: a reader (the restarted ranks, a benchmark) never sees half a file."""
        write_json(path, self.to_json())


def read(path: Path) -> Failure | None:
    """The record in ``path``, or None if there is none (or it is not one)."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        data = json.loads(path.read_text())
        return Failure.from_json(data) if isinstance(data, dict) else None
    return None
