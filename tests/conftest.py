"""Shared test helpers: start the launcher for real, read TensorBoard back, find leftover processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def start(run_dir: Path, *args: str, gpus: int = 2, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m launcher --gpus N --run-dir RUN_DIR ARGS…`` as a real child process."""
    return subprocess.Popen([sys.executable, "-m", "launcher", "--gpus", str(gpus), "--run-dir", str(run_dir), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for the launcher; on timeout stop it like a user would (SIGTERM, so it cleans up its ranks)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"launcher timed out after {timeout} s\n{out[-2000:]}\n{err[-2000:]}") from None
    return proc.returncode, out, err


def launch(run_dir: Path, *args: str, gpus: int = 2, timeout: float = 300) -> tuple[str, str]:
    """Run the launcher to completion and insist on exit 0; returns (stdout, stderr)."""
    code, out, err = finish(start(run_dir, *args, gpus=gpus), timeout)
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out, err


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard tag, read back with tensorboard's event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def newest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(newest, weights_only=True)["model"]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


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
