"""The launcher's watch over rank records (launcher/supervise/watch.py), on hand-written files: no processes."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from launcher.supervise.watch import HANG_EXIT_CODE, Timeouts, Watch, describe
from workers.contract.failure import Failure
from workers.contract.failure import read as read_failure

HOST = socket.gethostname()


def progress(run: Path, attempt: int, rank: int, **fields: object) -> None:
    folder = run / "attempts" / str(attempt)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "local_rank": rank, "pid": os.getpid(), "attempt": attempt, "host": "h", "hostname": HOST,
              "phase": "step", "step": 1, "steps": 1, "first_step_at": 0.0, "at": time.time(), **fields}
    (folder / f"rank{rank}.progress").write_text(json.dumps(record))


def exited(run: Path, attempt: int, rank: int, code: int, at: float, **fields: object) -> None:
    record = {"exit_code": code, "signal": None, "at": at, "peer_failed": False, "trained": True,
              "error_file": None, "log": None, **fields}
    (run / "attempts" / str(attempt) / f"rank{rank}.exit.json").write_text(json.dumps(record))


def test_the_first_own_failure_wins_over_earlier_consequences(tmp_path: Path) -> None:
    for r in range(3):
        progress(tmp_path, 0, r)
    exited(tmp_path, 0, 0, 1, at=10.0, peer_failed=True)  # earlier, but only because a peer died
    exited(tmp_path, 0, 1, 3, at=11.0)
    exited(tmp_path, 0, 2, 143, at=10.5, signal="SIGTERM")  # stopped by the runner
    watch = Watch(tmp_path, Timeouts(), world_size=3)
    watch.poll()
    record = watch.conclude()
    assert record is not None and (record.rank, record.exit_code, record.reason) == (1, 3, "exit")
    assert json.loads((tmp_path / "failure.json").read_text())["rank"] == 1
    assert "rank 1 failed (exit code 3)" in describe(record, hosts=False)


def test_a_rank_gone_without_an_exit_record_is_a_sigkill(tmp_path: Path) -> None:
    progress(tmp_path, 0, 0)
    progress(tmp_path, 0, 1, pid=2**22 + 12345)  # no such process
    exited(tmp_path, 0, 0, 1, at=time.time() + 5, peer_failed=True)
    watch = Watch(tmp_path, Timeouts(), world_size=2)
    watch.poll()
    record = watch.failure()
    assert record is not None and (record.rank, record.signal, record.exit_code) == (1, "SIGKILL", 137)


def test_a_clean_attempt_has_no_failure(tmp_path: Path) -> None:
    for r in range(2):
        progress(tmp_path, 0, r, phase="done")
        exited(tmp_path, 0, r, 0, at=1.0)
    watch = Watch(tmp_path, Timeouts(), world_size=2)
    watch.poll()
    assert watch.conclude() is None and not (tmp_path / "failure.json").exists()


def test_the_hang_suspect_is_the_rank_furthest_behind(tmp_path: Path) -> None:
    progress(tmp_path, 0, 0, step=8, phase="step")  # waiting in step 8's all-reduce
    progress(tmp_path, 0, 1, step=8, phase="data")  # still waiting for step 8's batch
    progress(tmp_path, 0, 2, step=8, phase="step")
    watch = Watch(tmp_path, Timeouts(step=0.2), world_size=3)
    watch.poll()
    assert watch.stalled() == []
    time.sleep(0.3)
    watch.poll()
    stuck = watch.stalled()
    assert len(stuck) == 3
    summary = watch.report_hang(stuck)
    assert "rank 1 on h" in summary and "<- stuck" in summary
    record = json.loads((tmp_path / "failure.json").read_text())
    assert (record["reason"], record["rank"], record["exit_code"]) == ("hang", 1, HANG_EXIT_CODE)
    assert watch.stalled() == []  # reported once per attempt


@pytest.mark.parametrize(("phase", "limit"), [("init", 1.0), ("data", 2.0), ("step", 2.0), ("eval", 2.0),
                                              ("checkpoint", 3.0), ("done", 0.0), ("failed", 0.0)])
def test_each_phase_has_its_timeout(phase: str, limit: float) -> None:
    assert Timeouts(init=1.0, step=2.0, checkpoint=3.0).of(phase) == limit


def test_recovery_is_measured_from_the_failure_to_the_next_first_step(tmp_path: Path) -> None:
    progress(tmp_path, 0, 0)
    exited(tmp_path, 0, 0, 3, at=100.0)
    watch = Watch(tmp_path, Timeouts(), world_size=1)
    watch.poll()
    progress(tmp_path, 1, 0, phase="init", steps=0, first_step_at=0.0)
    assert watch.poll() == 0  # attempt 0 ended: a newer one began
    assert watch.failures[0].recovered_after_s is None
    progress(tmp_path, 1, 0, steps=2, first_step_at=104.5)
    watch.poll()
    assert json.loads((tmp_path / "attempts" / "0" / "failure.json").read_text())["recovered_after_s"] == 4.5


EXIT_KEYS = {"attempt", "reason", "rank", "host", "local_rank", "pid", "exit_code", "signal", "at", "phase", "step",
             "first_step_reached", "note", "error_file", "log", "traceback", "log_tail", "ranks"}
HANG_KEYS = {"attempt", "reason", "rank", "host", "pid", "phase", "step", "stalled_s", "timeout_s", "exit_code",
             "signal", "at", "first_step_reached", "stacks", "traceback", "ranks"}


def test_failure_json_keeps_its_keys_and_reads_back(tmp_path: Path) -> None:
    """failure.json's keys are a format (old run directories, benchmarks): an exit record has its own, a hang its
    own, and the launcher's later additions appear once set; a record read back equals the one written."""
    progress(tmp_path, 0, 0)
    exited(tmp_path, 0, 0, 3, at=100.0)
    watch = Watch(tmp_path, Timeouts(), world_size=1)
    watch.poll()
    record = watch.conclude()
    assert record is not None
    on_disk = json.loads((tmp_path / "failure.json").read_text())
    assert set(on_disk) == EXIT_KEYS | {"restarts_before"}
    assert read_failure(tmp_path / "failure.json") == record and Failure.from_json(on_disk).to_json() == on_disk
    record.restarts_before, record.recovered_after_s = None, None
    assert set(record.to_json()) == EXIT_KEYS
    hang = Failure(attempt=1, reason="hang", rank=0, exit_code=HANG_EXIT_CODE, at=1.0, stalled_s=2.0, timeout_s=1.0,
                   stacks=str(tmp_path))
    assert set(hang.to_json()) == HANG_KEYS
    assert read_failure(tmp_path / "nothing.json") is None
