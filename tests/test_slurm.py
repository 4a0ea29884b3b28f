"""Slurm for real: munged + slurmctld + two slurmd on this machine (tests/slurm_cluster.py).

2 nodes x 1 CPU rank through slurm/train.sbatch and through `python -m launcher --slurm`, compared
with the same 2-rank job run locally; and preemption: USR1 -> checkpoint -> requeue -> resume.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_bitwise_equal, launch, newest_weights, tb_scalars
from slurm_cluster import Cluster, slurm_cluster, why_not

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

SHORT = ["trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=1000", "trainer.checkpoint_every=1000"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = why_not()
    if reason:
        pytest.skip(f"cannot start a Slurm cluster here: {reason}")
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as made:
        yield made


@pytest.fixture(scope="module")
def local_losses(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float]]:
    run_dir = tmp_path_factory.mktemp("local")
    launch(run_dir, *SHORT)
    return tb_scalars(run_dir)["train/loss"]


def slurm_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, **cluster.env, "PYTHON": sys.executable, **extra}


def assert_same_losses(run_dir: Path, expected: list[tuple[int, float]]) -> None:
    got = tb_scalars(run_dir)["train/loss"]
    assert [s for s, _ in got] == [s for s, _ in expected]
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]),
                               rtol=1e-5, atol=0)


def test_sbatch_template_two_nodes(cluster: Cluster, tmp_path: Path, local_losses: list) -> None:
    (tmp_path / "runs").mkdir()
    run_dir = tmp_path / "runs" / "two-nodes"
    proc = subprocess.run(["sbatch", "--parsable", "--wait", "-N2", "--ntasks-per-node=1",
                           str(ROOT / "slurm" / "train.sbatch"), *SHORT], cwd=tmp_path, capture_output=True,
                          text=True, env=slurm_env(cluster, RUN_DIR=str(run_dir)), timeout=300)
    job = proc.stdout.strip()
    log = (tmp_path / "runs" / f"slurm-launcher-{job}.out").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "node 0 of 2" in log and "node 1 of 2" in log  # one launcher per node, shape from SLURM_*
    assert list((run_dir / "checkpoints").glob("step-00000030.pt")) and list((run_dir / "tb").glob("events.*"))
    assert_same_losses(run_dir, local_losses)


def test_launcher_submits_and_waits(cluster: Cluster, tmp_path: Path, local_losses: list) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launcher", "--slurm", "--nodes", "2", "--gpus", "1", "--wait",
                           "--run-dir", str(run_dir), *SHORT], cwd=ROOT, capture_output=True, text=True,
                          env=slurm_env(cluster), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "launcher: submitted Slurm job" in proc.stdout
    assert "asking for CPUs only" in proc.stdout  # this cluster has no GPU GRES
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and f"#SBATCH --output={run_dir}/slurm-%j.out" in script
    assert_same_losses(run_dir, local_losses)


def wait_for_state(cluster: Cluster, job: str, states: set[str], timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while (state := cluster.job_state(job)) not in states:
        assert time.monotonic() < deadline, f"job {job} stuck in {state}, wanted {states}"
        time.sleep(0.5)
    return state


def wait_idle(cluster: Cluster, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        states = cluster.run("sinfo", "--Node", "--noheader", "--format=%t", check=False).stdout.split()
        if states and all(s == "idle" for s in states):
            return
        assert time.monotonic() < deadline, f"nodes never idle: {states}"
        time.sleep(0.5)


def test_preemption_checkpoints_requeues_and_resumes(cluster: Cluster, tmp_path: Path) -> None:
    long = ["trainer.max_steps=400", "trainer.log_every=1", "trainer.eval_every=1000", "trainer.checkpoint_every=40"]
    (tmp_path / "runs").mkdir()
    # the reference: the same job on the same two nodes, uninterrupted
    reference = tmp_path / "runs" / "reference"
    subprocess.run(["sbatch", "--parsable", "--wait", "-N2", "--ntasks-per-node=1",
                    str(ROOT / "slurm" / "train.sbatch"), *long], cwd=tmp_path, capture_output=True, text=True,
                   env=slurm_env(cluster, RUN_DIR=str(reference)), timeout=300, check=True)

    run_dir = tmp_path / "runs" / "preempted"
    env = slurm_env(cluster, RUN_DIR=str(run_dir))
    submitted = subprocess.run(["sbatch", "--parsable", "-N2", "--ntasks-per-node=1",
                                str(ROOT / "slurm" / "train.sbatch"), *long], cwd=tmp_path, capture_output=True,
                               text=True, env=env, timeout=60, check=True)
    job = submitted.stdout.strip()
    log = tmp_path / "runs" / f"slurm-launcher-{job}.out"
    deadline = time.monotonic() + 180
    while not list((run_dir / "checkpoints").glob("step-*.pt")):  # training is under way
        assert time.monotonic() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
            log.read_text() if log.exists() else cluster.job_state(job)
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job)  # what --signal=B:USR1@120 does before the limit

    wait_for_state(cluster, job, {"PENDING", "COMPLETED", "FAILED"})
    # skip Slurm's requeue delay, but only once the first run's steps are gone and a few seconds have
    # passed: slurmd refuses a job whose new credential is not newer (in whole seconds) than the one it
    # revoked when the first run ended ("job credential revoked")
    wait_idle(cluster)
    time.sleep(3)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
    state = wait_for_state(cluster, job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    text = log.read_text()
    assert state == "COMPLETED", text[-3000:]

    first, _, second = text.partition(f"slurm: job {job} restart 1 ")
    assert second, "the job ran a second time with SLURM_RESTART_COUNT=1:\n" + text[-3000:]
    assert "slurm: USR1: checkpointing, then requeueing" in first
    stopped = int(first.split("stopping on request at step ")[1].split(":")[0])
    assert 40 <= stopped < 400
    assert f"resuming from step {stopped}" in second, second[:3000]
    assert "restart count 1" in second
    steps = [s for s, _ in tb_scalars(run_dir)["train/loss"]]
    assert steps == list(range(1, 401))  # the curve continues: no step twice, none missing
    assert_bitwise_equal(newest_weights(run_dir), newest_weights(reference))
