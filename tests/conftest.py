"""Shared test helpers: start the launcher for real, read TensorBoard back, find leftover processes (by command
line, or by the run's LAUNCHER_JOB_TOKEN: pass ``env={TOKEN_VAR: token}`` to :func:`start`).

Nothing here mocks torch.distributed: the helpers start ``python -m launcher`` (which starts torchrun, which
starts gloo ranks) and read back what those processes left on disk and in /proc.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from bench.common import rank_pids  # noqa: F401 -- the tests' way to find ranks (benches kill them too)

ROOT = Path(__file__).resolve().parent.parent  # the repository root, wherever pytest is started from
LAUNCHER_TIMEOUT_S = 300.0  # a hung run fails the test instead of hanging the suite
TOKEN_VAR = "LAUNCHER_JOB_TOKEN"  # set in the launcher's environment, every process of its run carries it
TEST_HOOKS = "tests.rank_hooks"  # the LAUNCHER_TEST_* knobs, inside the ranks (workers/hooks.py)

# Every process a test starts inherits this, so every rank it leads to loads the tests' hooks: they act only
# where a test sets a LAUNCHER_TEST_* variable. Ranks import it from the checkout on their PYTHONPATH
# (launcher/resources.py); the ssh fan-out and Slurm pass LAUNCHER_* variables on.
if TEST_HOOKS not in os.environ.get("LAUNCHER_HOOKS", "").split(","):
    os.environ["LAUNCHER_HOOKS"] = ",".join(filter(None, [os.environ.get("LAUNCHER_HOOKS"), TEST_HOOKS]))


@pytest.fixture
def repo_root() -> Path:
    return ROOT


# -- starting the launcher -------------------------------------------------------------------------
def start(run_dir: Path, *args: str, gpus: int = 2, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m launcher --gpus N --run-dir RUN_DIR ARGS…`` as a real child process."""
    return subprocess.Popen([sys.executable, "-m", "launcher", "--gpus", str(gpus), "--run-dir", str(run_dir), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = LAUNCHER_TIMEOUT_S) -> tuple[int, str, str]:
    """Wait for the launcher; on timeout stop it like a user would (SIGTERM, so it cleans up its ranks)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"launcher timed out after {timeout} s\n{out[-2000:]}\n{err[-2000:]}") from None
    return proc.returncode, out, err


def run_launcher(args: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 timeout: float = LAUNCHER_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``python -m launcher ARGS`` to completion; never raises on a non-zero exit (tests check it).

    Unlike ``subprocess.run(timeout=…)``, which SIGKILLs the launcher and orphans its ranks (they run in
    sessions of their own), a timeout here sends SIGTERM so the launcher stops its ranks first."""
    argv = [sys.executable, "-m", "launcher", *args]
    proc = subprocess.Popen(argv, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    code, out, err = finish(proc, timeout)
    return subprocess.CompletedProcess(argv, code, out, err)


def launch(run_dir: Path, *args: str, gpus: int = 2, timeout: float = LAUNCHER_TIMEOUT_S) -> tuple[str, str]:
    """Run the launcher to completion and insist on exit 0; returns (stdout, stderr)."""
    code, out, err = finish(start(run_dir, *args, gpus=gpus), timeout)
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


# -- reading results back --------------------------------------------------------------------------
def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under RUN_DIR/tb -> [(step, value), …], read back with tensorboard's event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag (KeyError if the run never logged it)."""
    return tb_scalars(run_dir)[tag]


def seen_samples(log_dir: Path) -> list[tuple[int, int]]:
    """(epoch, dataset index) of every sample any rank trained on, from the sample-log test hook
    (LAUNCHER_TEST_SAMPLE_LOG)."""
    out = []
    for path in log_dir.glob("rank*.txt"):
        for line in path.read_text().splitlines():
            epoch, *idx = map(int, line.split())
            out += [(epoch, i) for i in idx]
    return out


def newest_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]


def newest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(newest_checkpoint(run_dir), weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- leftover processes ----------------------------------------------------------------------------
def run_processes(marker: str | Path) -> list[int]:
    """Live (non-zombie) processes whose command line mentions ``marker`` (e.g. the run directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                mentions = str(marker).encode() in (proc / "cmdline").read_bytes()
                if mentions and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def leftover_processes(marker: str | Path, grace_s: float = 10.0) -> list[str]:
    """Command lines of processes mentioning ``marker`` that are still alive after ``grace_s``.

    Killed children can take a moment to be reaped by init after the launcher returns; that is not a leak,
    so poll instead of asserting on one snapshot. Returns [] as soon as none is left."""
    return _still_alive(lambda: run_processes(marker), grace_s)


def token_processes(token: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``LAUNCHER_JOB_TOKEN=token``: every process of a run
    started with that token in the launcher's environment (runners, ranks, ssh clients, node agents), whatever
    their command lines, parents or sessions."""
    entry, found = f"{TOKEN_VAR}={token}".encode(), []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if entry in (proc / "environ").read_bytes().split(b"\0") and \
                        (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def leftover_token_processes(token: str, grace_s: float = 10.0) -> list[str]:
    """Command lines of the processes carrying ``token`` still alive after ``grace_s`` ([] as soon as none is)."""
    return _still_alive(lambda: token_processes(token), grace_s)


def _still_alive(find: Callable[[], list[int]], grace_s: float) -> list[str]:
    deadline = time.monotonic() + grace_s
    while (pids := find()) and time.monotonic() < deadline:
        time.sleep(0.1)
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):  # it may have gone away after all
            out.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return out


# -- waiting for and finding ranks -----------------------------------------------------------------
def wait_for(predicate, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


