"""Failures as users meet them, with real runners: a rank's exit code, a hang, a restart, a start-up crash.

Every rank writes RUN_DIR/attempts/<N>/rank<R>.{progress,exit.json,stacks} (workers/rank.py); the
launcher reads them to name the first failing rank in failure.json, to find a stuck rank, and to
decide on restarts (launcher/supervise/watch.py). No console text is parsed for any of it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import finish, run_launcher, scalars, start

pytestmark = pytest.mark.slow

BACKENDS = ["torchrun", pytest.param("horovod", marks=pytest.mark.horovod), pytest.param("mpi", marks=pytest.mark.mpi)]

# a torchrun-style script (no torch.distributed needed to fail): rank 1 exits 3, rank 0 waits to be stopped
EXIT_3 = """
import os, sys, time
rank = int(os.environ.get("RANK") or os.environ.get("HOROVOD_RANK"))
said = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank0.said")
print(f"hello from {rank}", flush=True)
if rank == 0:
    open(said, "w").close()
else:  # fail once rank 0 has printed, however late its interpreter started
    for _ in range(600):
        if os.path.exists(said):
            break
        time.sleep(0.1)
    time.sleep(0.5)
    sys.exit(3)
time.sleep(60)
"""


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rank_exit_code_is_the_launchers_and_failure_json_names_the_rank(tmp_path: Path, backend: str) -> None:
    script = tmp_path / "fail.py"
    script.write_text(EXIT_3)
    run_dir = tmp_path / "run"
    proc = run_launcher(["--backend", backend, "--gpus", "2", "--run-dir", str(run_dir), "--", str(script)],
                        cwd=tmp_path, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    failure = json.loads((run_dir / "failure.json").read_text())
    assert (failure["rank"], failure["exit_code"], failure["attempt"], failure["reason"]) == (1, 3, 0, "exit")
    assert failure["host"] and failure["pid"]
    assert json.loads((run_dir / "attempts" / "0" / "failure.json").read_text()) == failure
    assert "rank 1" in proc.stderr and "exit code 3" in proc.stderr
    # every backend's output carries the same rank prefix (mpirun's and horovodrun's own tags are replaced)
    assert "[rank0]:hello from 0" in proc.stdout and "[rank1]:hello from 1" in proc.stdout, proc.stdout


def test_a_crash_names_the_rank_and_its_traceback_from_the_error_file(tmp_path: Path) -> None:
    """The built-in trainer's own exception: the traceback comes from torchrun's @record error file."""
    run_dir = tmp_path / "run"
    proc = run_launcher(["--gpus", "2", "--run-dir", str(run_dir), "trainer.max_steps=5",
                         "model._target_=torch.nn.Identity"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    failure = json.loads((run_dir / "failure.json").read_text())
    assert failure["exit_code"] == 1 and failure["rank"] in (0, 1) and not failure["first_step_reached"]
    assert failure["error_file"] and Path(failure["error_file"]).is_file()
    assert any("Error" in line for line in failure["traceback"]), failure["traceback"]


def test_no_restart_when_an_attempt_fails_before_its_first_step(tmp_path: Path) -> None:
    """An Identity model has no parameters: the optimizer raises at start-up, and would on every restart."""
    run_dir = tmp_path / "run"
    proc = run_launcher(["--gpus", "2", "--max-restarts", "3", "--run-dir", str(run_dir), "trainer.max_steps=5",
                         "model._target_=torch.nn.Identity"], cwd=tmp_path, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert "failed before its first training step: not restarting" in proc.stderr
    assert not (run_dir / "attempts" / "2").exists()  # at most the one restart torchrun began meanwhile


@pytest.mark.parametrize("backend", ["torchrun", pytest.param("mpi", marks=pytest.mark.mpi)])
def test_a_hung_rank_is_named_its_stack_saved_and_the_run_stopped(tmp_path: Path, backend: str) -> None:
    run_dir = tmp_path / "run"
    began = time.monotonic()
    proc = run_launcher(["--backend", backend, "--gpus", "2", "--run-dir", str(run_dir), "--hang-timeout", "4",
                         "trainer.max_steps=40"], cwd=tmp_path, env={"LAUNCHER_TEST_HANG": "1:3"}, timeout=120)
    took = time.monotonic() - began
    assert proc.returncode == 124, proc.stdout + proc.stderr
    failure = json.loads((run_dir / "failure.json").read_text())
    assert (failure["reason"], failure["rank"], failure["step"]) == ("hang", 1, 3)
    assert "hang: rank 1 on" in proc.stderr
    stacks = (run_dir / "attempts" / "0" / "rank1.stacks").read_text()
    assert "maybe_hang" in stacks  # the hung rank's own Python stack, from faulthandler
    assert (run_dir / "attempts" / "0" / "rank0.stacks").read_text()  # and its peer's, waiting for it
    assert "<- stuck" in (run_dir / "attempts" / "0" / "hang.txt").read_text()
    # start-up (a few seconds here) + 3 steps + the 4 s timeout + at most 10 s to collect stacks and stop
    assert took < 60, took


def test_a_hang_under_max_restarts_restarts_and_finishes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_launcher(["--gpus", "2", "--run-dir", str(run_dir), "--hang-timeout", "8", "--max-restarts", "1",
                         "--restart-backoff", "0.2", "trainer.max_steps=12", "trainer.checkpoint_every=2"],
                        # the restarted ranks take 12 s to report in, as slow imports would: longer than the
                        # launcher gives a runner to notice its killed ranks, which must not count against them
                        cwd=tmp_path, env={"LAUNCHER_TEST_HANG": "1:5", "LAUNCHER_TEST_SLOW_RESTART_S": "12"},
                        timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    failure = json.loads((run_dir / "attempts" / "0" / "failure.json").read_text())
    assert (failure["reason"], failure["rank"]) == ("hang", 1)
    assert failure["recovered_after_s"] > 0
    assert json.loads((run_dir / "result.json").read_text())["step"] == 12
    assert [v for _, v in scalars(run_dir, "restarts/count")] == [1.0]
    assert scalars(run_dir, "restarts/recovery_s")[0][1] > 0


def test_a_killed_rank_is_reported_as_sigkill_and_recovery_is_measured(tmp_path: Path) -> None:
    from conftest import rank_pids, wait_for

    run_dir = tmp_path / "run"
    proc = start(run_dir, "--max-restarts", "1", "--restart-backoff", "0.1", "trainer.max_steps=40",
                 "trainer.checkpoint_every=5", env={"LAUNCHER_TEST_SLOW_STEP_S": "0.1"})
    wait_for(lambda: list((run_dir / "checkpoints").glob("step-*.json")))  # a complete checkpoint (its manifest)
    import os
    import signal

    os.kill(rank_pids(run_dir)[1], signal.SIGKILL)
    code, out, err = finish(proc)
    assert code == 0, out + err
    failure = json.loads((run_dir / "attempts" / "0" / "failure.json").read_text())
    assert (failure["rank"], failure["signal"], failure["exit_code"]) == (1, "SIGKILL", 137), failure
    assert 0 < failure["recovered_after_s"] < 60
    assert "killed by SIGKILL" in err
