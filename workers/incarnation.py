"""Horovod Elastic: each worker's records are its own, whatever rank Horovod gives it.

Horovod starts a failed slot's worker again within the same attempt, and renumbers the ranks after every reset.
Records named by the Horovod rank at start were overwritten: a worker started again as rank 1 truncated the
failed rank 1's records (the evidence of its failure), or a survivor's, whose start rank it took. So under Horovod
Elastic (``HOROVOD_ELASTIC=1``, which horovodrun sets) a worker is named by its *slot* S, the place of its host's
line in the hosts file (a slot runs one worker at a time), and writes its records into a folder of its own,
``attempts/<N>/slot<S>/<k>/rank<S>.*`` (k: its start on that slot, 0 the first; claimed with mkdir, so two never
share one). The attempt folder's ``rank<S>.*`` are links to the slot's newest worker's: the launcher's watch,
failure report and hang watch read those as before. Everywhere else nothing changes.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from pathlib import Path

from workers import contract
from workers.contract.failure import Failure
from workers.files import read_json

ELASTIC_ENV = "HOROVOD_ELASTIC"  # "1" in every worker of an elastic horovodrun (horovod/runner/gloo_run.py)
KINDS = (contract.PROGRESS, contract.EXIT, contract.STACKS, contract.ERROR)


def elastic_slot(environ: Mapping[str, str], run_dir: Path) -> tuple[int, str] | None:
    """(slot, the slot's host name) of a Horovod Elastic worker: the slots of the hosts file's lines before its host's,
    plus its local rank. None outside Horovod Elastic, or for a host the file does not list."""
    host = environ.get("HOROVOD_HOSTNAME")
    if environ.get(ELASTIC_ENV) != "1" or not host:
        return None
    slots = host_slots(run_dir, host)
    return (slots[0] + int(environ.get("HOROVOD_LOCAL_RANK") or 0), host) if slots else None


def place(folder: Path, rank: int, environ: Mapping[str, str], run_dir: Path) -> tuple[Path, int, dict[str, str]]:
    """Where this process writes its records, under which number, and what its progress record adds: the attempt
    folder and its rank, or under Horovod Elastic a new folder of the slot's, the slot, and the slot's host name."""
    slot = elastic_slot(environ, run_dir)
    if slot is None:
        return folder, rank, {}
    for k in itertools.count():
        own = contract.incarnation_dir(folder, slot[0], k)
        try:
            own.mkdir(parents=True)
        except FileExistsError:  # an earlier worker's on this slot
            continue
        return own, slot[0], {"slot": slot[1]}
    raise AssertionError("unreachable")


def link(folder: Path, own: Path, slot: int) -> None:
    """The attempt folder's ``rank<S>.*`` -> this worker's own (an exit or error record not written yet is a
    dangling link, as good as none to every reader). Relative links: the run directory may be moved."""
    if own == folder:
        return
    for kind in KINDS:
        flat = contract.rank_file(folder, slot, kind)
        tmp = folder / f".{flat.name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(contract.rank_file(own, slot, kind).relative_to(folder))
        tmp.replace(flat)  # a reader sees the earlier worker's records or this one's, never none


def hosts(run_dir: Path) -> dict[str, int]:
    """{host: slots} of the hosts file's ``host:slots`` lines, in its order ({} when there is none)."""
    try:
        lines = contract.elastic_hosts_file(run_dir).read_text().split()
    except OSError:
        return {}
    return {name: int(slots) for name, _, slots in (line.rpartition(":") for line in lines)}


def host_slots(run_dir: Path, host: str) -> list[int]:
    """The slots of ``host``'s line in the hosts file (a host of N slots has N; [] when it is not listed)."""
    before = 0
    for name, slots in hosts(run_dir).items():
        if name == host:
            return list(range(before, before + slots))
        before += slots
    return []


def record_departure(run_dir: Path, attempt: int, host: str, step: int) -> list[Path]:
    """A worker of ``host`` left the job (Horovod reset without it): its failure record, ``failure.json`` in its own
    folder beside its other records (the newest on each of the host's slots), as the launcher writes one per
    attempt elsewhere. From its exit record when it wrote one (an exception, an exit code); else it died without
    one (SIGKILL, the OOM killer, or lost with its host). Returns the files written."""
    folder, written = contract.attempt_dir(run_dir, attempt), []
    for slot in host_slots(run_dir, host):
        own = max((p for p in (folder / f"slot{slot}").glob("*") if p.name.isdigit()), key=lambda p: int(p.name),
                  default=None)
        if own is None or contract.failure_file(own).exists():
            continue
        info = read_json(contract.rank_file(own, slot, contract.PROGRESS)) or {}
        end = read_json(contract.rank_file(own, slot, contract.EXIT)) or {}
        died = not end or not end.get("exit_code")  # no record, or one of a clean exit: it did not end on its own
        Failure(attempt=attempt, reason="signal" if died or end.get("signal") else "exit", rank=slot,
                exit_code=137 if died else int(end["exit_code"]), at=float(end.get("at") or time.time()),
                host=host, pid=info.get("pid"), signal="SIGKILL" if died else end.get("signal"),
                phase=info.get("phase"), step=info.get("step", step), first_step_reached=bool(info.get("steps")),
                note="no exit record: killed (a kill -9, the OOM killer) or lost with its host" if died else None,
                error_file=end.get("error_file"), log=end.get("log")).write(contract.failure_file(own))
        written.append(contract.failure_file(own))
    return written
