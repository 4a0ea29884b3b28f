"""Watch a running job through the files its ranks write (workers/rank.py, workers/progress.py).

Every rank keeps ``RUN_DIR/attempts/<N>/rank<R>.progress`` (phase, step) current and writes
``rank<R>.exit.json`` when it ends. From them the launcher tells, without parsing any console text:

* a **hang**: a rank whose record has not changed for longer than its phase's timeout (init, step —
  eval counts as step —, checkpoint). The suspect is the rank furthest behind: in data parallelism
  the others wait for it in the next collective, one step ahead.
* the **first failure** of an attempt: the earliest rank that exited non-zero on its own (not
  because a peer died, not stopped by a signal it was sent), or that died without an exit record
  (SIGKILL, the OOM killer) — then, failing those, the rest. Written to
  ``attempts/<N>/failure.json`` and ``RUN_DIR/failure.json`` (the newest attempt's).
* the **recovery**: seconds from an attempt's failure to the first step of the next one.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launcher.supervise.procs import alive, stat_fields
from workers import contract
from workers.contract import CHECKPOINT, DATA, EVAL, INIT, PHASES, STEP
from workers.contract.failure import HANG, Failure
from workers.files import read_json

HANG_EXIT_CODE = 124  # the launcher's exit status after a hang, as timeout(1)'s
TRACEBACK_LINES = 30
LOG_LINES = 15


@dataclass(frozen=True)
class Timeouts:
    """Seconds without progress before a rank counts as stuck, per phase; 0 turns a check off."""

    init: float = 900.0  # start-up to the first step: imports, rendezvous, dataset, model, checkpoint load
    step: float = 300.0  # between steps, and between eval batches
    checkpoint: float = 900.0

    def of(self, phase: str) -> float:
        between = self.step if phase in (DATA, STEP, EVAL) else 0  # done, failed: nothing to wait for
        return {INIT: self.init, CHECKPOINT: self.checkpoint}.get(phase, between)


@dataclass
class Rank:
    """What the launcher knows of one rank in the current attempt (under Horovod Elastic: of one slot's newest
    worker, launcher/supervise/elastic_hang.py)."""

    rank: int
    record: dict = field(default_factory=dict)  # the rank's last progress record
    seen: float = 0.0  # launcher's monotonic clock when the record last changed
    died_at: float | None = None  # wall time the launcher found it gone without an exit record

    @property
    def phase(self) -> str:
        return self.record.get("phase", INIT)

    @property
    def where(self) -> str:
        return f"{self.record.get('host', '?')}:{self.rank}"

    @property
    def pid(self) -> int:
        return int(self.record.get("pid", 0))

    @property
    def stopped(self) -> bool:
        """SIGSTOPped (or stopped by a tracer): it cannot be anything but the one the others wait for."""
        return stat_fields(self.pid)[:1] in (["T"], ["t"])


class Watch:
    def __init__(self, run_dir: Path, timeouts: Timeouts, *, world_size: int,
                 log_of: Callable[[int, int], Path | None] = lambda rank, attempt: None) -> None:
        self.run_dir, self.timeouts, self.world_size, self.log_of = run_dir, timeouts, world_size, log_of
        self.root = contract.attempts_dir(run_dir)
        self.attempt = -1
        self.ranks: dict[int, Rank] = {}
        self.started = time.monotonic()  # of the current attempt, as the launcher saw it begin
        self.hang: Failure | None = None  # the current attempt's hang report, once found
        self.failures: dict[int, Failure] = {}  # attempt -> its failure record
        self.concluded: set[int] = set()  # attempts known to have ended
        self.host = socket.gethostname()

    # -- reading ---------------------------------------------------------------------------------
    def folder(self, attempt: int | None = None) -> Path:
        return contract.attempt_dir(self.run_dir, self.attempt if attempt is None else attempt)

    def _newest(self) -> int:
        with contextlib.suppress(OSError):
            return max((int(p.name) for p in self.root.iterdir() if p.name.isdigit()), default=-1)
        return -1

    def poll(self) -> int | None:
        """Read the newest attempt's records. Returns the number of an attempt that just ended (a newer one
        began), else None."""
        ended = None
        newest = self._newest()
        if newest > self.attempt:
            if self.attempt >= 0 and self.attempt not in self.concluded:  # the runner restarted (torchrun)
                self.conclude()
                ended = self.attempt
            self.attempt, self.ranks, self.hang, self.started = newest, {}, None, time.monotonic()
        if self.attempt < 0:
            return ended
        now = time.monotonic()
        for path in contract.rank_files(self.folder(), contract.PROGRESS):
            record = read_json(path)
            if record is None:
                continue  # caught mid-write
            rank = self.ranks.setdefault(record["rank"], Rank(record["rank"], seen=now))
            if record != rank.record:
                rank.record, rank.seen = record, now
            if (rank.died_at is None and record.get("hostname") == self.host and not alive(record["pid"])
                    and not contract.rank_file(self.folder(), rank.rank, contract.EXIT).exists()):
                rank.died_at = time.time()
        self._note_recovery()
        return ended

    def exits(self, attempt: int) -> dict[int, dict]:
        folder = self.folder(attempt)
        return {contract.rank_of(p): r for p in contract.rank_files(folder, contract.EXIT) if (r := read_json(p))}

    # -- hangs -----------------------------------------------------------------------------------
    def stalled(self) -> list[Rank]:
        """The ranks past their phase's timeout (none once a hang was reported for this attempt)."""
        if self.hang is not None:
            return []
        now = time.monotonic()
        out = [r for r in self.ranks.values()
               if (limit := self.timeouts.of(r.phase)) and now - r.seen > limit and r.died_at is None]
        # the attempt's own world size, as its ranks report it: an elastic job's shrinks when a node leaves
        world = max((r.record.get("world_size", 0) for r in self.ranks.values()), default=0) or self.world_size
        missing = world - len(self.ranks)
        if missing > 0 and self.timeouts.init and now - self.started > self.timeouts.init:
            out += [Rank(r, seen=self.started) for r in range(world) if r not in self.ranks]
        return out

    def report_hang(self, stuck: list[Rank]) -> str:
        """Record the hang as this attempt's failure; the summary for the console."""
        now = time.monotonic()
        ranks = sorted(self.ranks.values(), key=lambda r: r.rank)
        suspect = min(stuck, key=lambda r: (r.record.get("step", -1), PHASES.index(r.phase), r.seen))
        limit = self.timeouts.of(suspect.phase)
        self.hang = Failure(
            attempt=self.attempt, reason=HANG, rank=suspect.rank, host=suspect.record.get("host"),
            pid=suspect.record.get("pid"), phase=suspect.phase, step=suspect.record.get("step"),
            stalled_s=round(now - suspect.seen, 1), timeout_s=limit, exit_code=HANG_EXIT_CODE,
            at=round(time.time(), 3), first_step_reached=self._trained(), stacks=str(self.folder()),
            ranks=[{"rank": r.rank, "host": r.record.get("host"), "phase": r.phase, "step": r.record.get("step"),
                    "stalled_s": round(now - r.seen, 1)} for r in ranks])
        self._write(self.hang)
        rows = [f"  {'host:rank':<24} {'phase':<11} {'last step':>9} {'no progress for':>16}"]
        rows += [f"  {r.where:<24} {r.phase:<11} {r.record.get('step', '-')!s:>9} {now - r.seen:>14.0f} s"
                 + ("   <- stuck" if r.rank == suspect.rank else "") for r in ranks]
        summary = "\n".join([
            f"launcher: hang: rank {suspect.rank} on {suspect.record.get('host', '?')} made no progress for "
            f"{now - suspect.seen:.0f} s in phase {suspect.phase} (timeout {limit:g} s) at step "
            f"{suspect.record.get('step', '-')}; every rank's Python stack: {self.folder()}/rank<R>.stacks", *rows])
        contract.hang_report(self.folder()).write_text(summary + "\n")
        return summary

    def stacks_written(self) -> bool:
        """Every live rank of the attempt has dumped its stacks (after SIGUSR2)."""
        with contextlib.suppress(OSError):
            return all(contract.rank_file(self.folder(), r.rank, contract.STACKS).stat().st_size
                       for r in self.ranks.values() if r.died_at is None)
        return False

    # -- failures --------------------------------------------------------------------------------
    def _trained(self, attempt: int | None = None, exits: dict[int, dict] | None = None) -> bool:
        """Whether a rank of the attempt finished a step (``exits``: its exit records, when read already)."""
        attempt = self.attempt if attempt is None else attempt
        if attempt == self.attempt and any(r.record.get("steps", 0) for r in self.ranks.values()):
            return True
        return any(e.get("trained") for e in (self.exits(attempt) if exits is None else exits).values())

    def failure(self, attempt: int | None = None, ended: bool = False) -> Failure | None:
        """The attempt's first failure, from the exit records (and the deaths without one), or its hang.
        ``ended``: the attempt is over, so a rank without an exit record is dead."""
        attempt = self.attempt if attempt is None else attempt
        if attempt < 0:
            return None
        if attempt == self.attempt and self.hang is not None:
            return self.hang
        if attempt in self.failures and self.failures[attempt].hang:
            return self.failures[attempt]
        exits = self.exits(attempt)
        failed = [(rank, rec) for rank, rec in exits.items() if rec.get("exit_code")]
        own = [(rec["at"], rank, rec) for rank, rec in failed if not rec.get("peer_failed") and not rec.get("signal")]
        unrecorded = [r for r in self.ranks.values() if r.rank not in exits] if attempt == self.attempt else []
        # deaths without an exit record (SIGKILL, the OOM killer) that the launcher saw on this host, when
        own += [(r.died_at, r.rank, killed(r.died_at)) for r in unrecorded if r.died_at is not None]
        rest = [(rec["at"], rank, rec) for rank, rec in failed if rec.get("peer_failed") or rec.get("signal")]
        if not own and ended:  # on another host the launcher cannot watch the pid: gone once the attempt ended
            own = [(r.record.get("at", 0.0), r.rank, killed(r.record.get("at", 0.0))) for r in unrecorded]
        if not own and not rest:
            return None
        at, rank, rec = min(own or rest, key=lambda t: (t[0], t[1]))
        info = self.ranks.get(rank, Rank(rank)).record if attempt == self.attempt else {}
        log = rec.get("log") or _str(self.log_of(rank, attempt))
        traceback = self._traceback(rec, rank, attempt)
        return Failure(
            attempt=attempt, reason="signal" if rec.get("signal") else "exit", rank=rank,
            host=info.get("host"), local_rank=info.get("local_rank"), pid=info.get("pid"),
            exit_code=rec["exit_code"], signal=rec.get("signal"), at=at,
            phase=info.get("phase"), step=info.get("step"), first_step_reached=self._trained(attempt, exits),
            note="no exit record: killed by SIGKILL (a kill -9, or the OOM killer)" if rec.get("killed") else None,
            error_file=rec.get("error_file"), log=log, traceback=traceback,
            log_tail=_log_tail(log, without_traceback=bool(traceback)),
            ranks=[{"rank": r, "exit_code": e["exit_code"], "signal": e.get("signal"),
                    "peer_failed": e.get("peer_failed")} for r, e in sorted(failed)])

    def _traceback(self, rec: dict, rank: int, attempt: int) -> list[str]:
        """The tail of the rank's traceback: its error file (torchrun's format), else its fatal-signal dump."""
        error = read_json(Path(rec["error_file"])) if rec.get("error_file") else None
        if error is not None:
            info = error.get("message", {})
            text = info.get("extraInfo", {}).get("py_callstack") if isinstance(info, dict) else None
            return (text or str(info)).rstrip().splitlines()[-TRACEBACK_LINES:]
        return _tail(contract.rank_file(self.folder(attempt), rank, contract.STACKS), TRACEBACK_LINES)  # fatal signal

    def conclude(self) -> Failure | None:
        """The current attempt ended: its final failure record (written), or None if it did not fail."""
        self.concluded.add(self.attempt)
        record = self.failure(ended=True)
        if record is not None:
            record.restarts_before = self.attempt
            self.failures[self.attempt] = record
            self._write(record)
        return record

    def _write(self, record: Failure) -> None:
        record.write(contract.failure_file(self.folder(record.attempt)))
        if record.attempt >= self._newest():
            record.write(contract.failure_file(self.run_dir))

    def _note_recovery(self) -> None:
        """Once the attempt after a failure trains its first step: the seconds that took, into that failure."""
        before = self.failures.get(self.attempt - 1)
        if before is None or before.recovered_after_s is not None:
            return
        firsts = [r.record["first_step_at"] for r in self.ranks.values() if r.record.get("first_step_at")]
        if firsts:
            before.recovered_after_s = round(min(firsts) - before.at, 3)
            self._write(before)


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _tail(path: str | Path | None, lines: int) -> list[str]:
    with contextlib.suppress(OSError, TypeError):
        return Path(path).read_text(errors="replace").rstrip().splitlines()[-lines:]  # type: ignore[arg-type]
    return []


def _log_tail(log: str | None, without_traceback: bool) -> list[str]:
    """The end of the rank's log; when its traceback is shown already, what it printed before that."""
    lines = _tail(log, 10 * LOG_LINES)
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if without_traceback and starts:
        lines = lines[:starts[-1]]
    return lines[-LOG_LINES:]


def killed(at: float) -> dict:
    """The exit record of a rank that died without writing one."""
    return {"exit_code": 137, "signal": "SIGKILL", "at": at, "killed": True}


def describe(record: Failure, hosts: bool = True) -> str:
    """The console summary of a failure record (``hosts``: name the rank's host)."""
    if record.hang:
        return (f"launcher: attempt {record.attempt} hung: rank {record.rank} on {record.host} "
                f"(phase {record.phase}, step {record.step}); stacks: {record.stacks}")
    how = f"killed by signal {record.signal}" if record.signal else f"exit code {record.exit_code}"
    where = f" on {record.host}" if hosts and record.host else ""
    lines = [f"launcher: rank {record.rank}{where} failed ({how}), the first to fail in attempt "
             f"{record.attempt}" + (f"; log: {record.log}" if record.log else "")]
    if record.note:
        lines.append(f"  {record.note}")
    if record.traceback:
        lines.append(f"---- its traceback ({record.error_file or 'stacks'}) ----")
        lines += record.traceback
    if record.log_tail:
        lines.append("---- its log" + (" before that ----" if record.traceback else " ----"))
        lines += record.log_tail
    others = [r for r in record.ranks if r["rank"] != record.rank]
    if others:
        lines.append("then: " + ", ".join(
            f"rank {r['rank']} " + ("(a peer failed)" if r["peer_failed"] else
                                    f"({r['signal'] or 'exit ' + str(r['exit_code'])})") for r in others))
    return "\n".join(lines)
