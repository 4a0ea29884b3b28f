"""The command line through a real `python -m launcher`: bad input exits 2 with one line, starting nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["trainer.nope=1"], "bad config override"),
        (["trainer.max_steps=abc"], "bad config override"),
        (["optimizer=nope"], "bad config override"),
        (["--gpus", "0"], "--gpus 0"),
        (["--nodes", "2"], "needs --node-rank and --master-addr"),
        (["--", "missing_script.py"], "script missing_script.py not found"),
        (["--hostfile", "/nonexistent/hosts", "--backend", "horovod"], "does not exist"),
        (["--backend", "nope"], "invalid choice"),
        (["--", "x.py", "trainer.max_steps=1"], "not found"),
        (["--"], "nothing after `--`"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path: Path, args: list[str], message: str) -> None:
    run_dir = tmp_path / "run"
    proc = cli("--gpus", "1", "--run-dir", str(run_dir), *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error:") and message in lines[0], proc.stderr
    assert proc.stdout == ""
    assert not run_dir.exists()


def test_bad_override_leaves_an_existing_run_dir_untouched(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    files = {run_dir / "config.yaml": b"trainer:\n  max_steps: 7\n",
             run_dir / "checkpoints" / "step-00000007.pt": b"weights", run_dir / "plan.json": b"{}"}
    for path, content in files.items():
        path.write_bytes(content)
    proc = cli("--run-dir", str(run_dir), "trainer.max_step=9")
    assert proc.returncode == 2
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.name for p in run_dir.rglob("*")) == ["checkpoints", "config.yaml", "plan.json",
                                                          "step-00000007.pt"]


def test_dry_run_prints_the_commands_and_starts_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = cli("--gpus", "2", "--run-dir", str(run_dir), "--dry-run", "optimizer=sgd")
    assert proc.returncode == 0, proc.stderr
    assert "dry run, nothing started" in proc.stdout
    assert "-m torch.distributed.run --nnodes 1 --nproc-per-node 2" in proc.stdout
    assert f"-m workers.train --run-dir {run_dir}" in proc.stdout
    assert "OMP_NUM_THREADS=" in proc.stdout
    assert not run_dir.exists()


def test_dry_run_horovod_and_mpi(tmp_path: Path) -> None:
    out = cli("--backend", "horovod", "--gpus", "2", "--run-dir", str(tmp_path / "r"), "--dry-run").stdout
    assert "cmd: horovodrun -np 2 -H localhost:2 --gloo" in out
    out = cli("--backend", "mpi", "--gpus", "2", "--run-dir", str(tmp_path / "r"), "--dry-run").stdout
    assert "cmd: mpirun -np 2 -H localhost:2 --bind-to none" in out


def test_help_is_the_manual() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for text in ("--gpus", "--dry-run", "--backend", "RANK, LOCAL_RANK, WORLD_SIZE", "Exit status"):
        assert text in proc.stdout
