"""RUN_DIR/events.jsonl: one JSON record per failure, drop, reset, rejoin or heal of a fault-tolerant run.

Written by the ranks (distributed/ft.py under torchft, distributed/elastic.py under Horovod Elastic) and by the
launcher (supervise/supervisor.py: a replica group's failure or hang); read by the closing summary and the goodput
bench. Every record has ``time``, ``kind`` and ``step``; each writer adds what it knows (``group``, ``rank``,
``stall_s``, ``size``...). One ``os.write`` of a whole line per record: appends from several processes interleave
as whole lines."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from workers import contract


def append(run_dir: Path, kind: str, step: object, **facts: object) -> dict[str, Any]:
    """Add one record (``time`` now) and return it; a run directory that is gone is no error."""
    record = {"time": round(time.time(), 3), "kind": kind, "step": step, **facts}
    try:
        fd = os.open(contract.events_file(run_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return record
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)
    return record


def read(run_dir: Path) -> list[dict[str, Any]]:
    path = contract.events_file(run_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
