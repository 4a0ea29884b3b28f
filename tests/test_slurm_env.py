"""Slurm allocation detection: nodelist expansion and job shape from SLURM_* variables (no Slurm needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from launcher.errors import UsageError
from launcher.slurm.env import Allocation, allocation, check_flags, expand_nodelist


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu[007-009,12]", ["gpu007", "gpu008", "gpu009", "gpu12"]),
        ("a[1-2],b,c[5]", ["a1", "a2", "b", "c5"]),
        ("host-x[0-1]", ["host-x0", "host-x1"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_bad_nodelist() -> None:
    with pytest.raises(UsageError, match="SLURM_JOB_NODELIST"):
        expand_nodelist("node[a-b]")


# what srun gives the task on the second node of a 2-node job step
JOB = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
       "SLURM_STEP_NUM_NODES": "2"}


def test_allocation_from_env() -> None:
    assert allocation({}) is None
    # port: 15000 + the id's last 4 digits; master: the first host, unless MASTER_ADDR says (the sbatch
    # templates export the first node's NodeAddr)
    assert allocation(JOB) == Allocation("123456", 2, 1, "node1", 18456, ("node1", "node2"))
    assert allocation({**JOB, "MASTER_PORT": "29400"}).master_port == 29400
    assert allocation({**JOB, "MASTER_ADDR": "10.0.0.7"}).master_addr == "10.0.0.7"
    assert allocation({**JOB, "SLURM_RESTART_COUNT": "2"}).restart_count == 2


def test_flags_must_agree_with_the_allocation() -> None:
    alloc = allocation(JOB)
    check_flags(alloc, 2, 1, "node1")
    check_flags(alloc, None, None, None)
    with pytest.raises(UsageError, match="--nodes 4 but Slurm job 123456 says 2"):
        check_flags(alloc, 4, None, None)


def test_launcher_inside_an_allocation_plans_from_slurm(tmp_path) -> None:  # noqa: ANN001
    env = {**os.environ, **JOB}
    out = subprocess.run([sys.executable, "-m", "launcher", "--gpus", "2", "--run-dir", str(tmp_path), "--dry-run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--nnodes 2 --nproc-per-node 2 --rdzv-backend c10d" in out.stdout and "is_host=0" in out.stdout
    assert "--rdzv-endpoint node1:18456" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "launcher", "--nodes", "3", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "says 2" in bad.stderr


def test_outside_an_srun_step_is_told_from_one_task_per_node() -> None:
    from launcher.slurm.env import outside_step

    salloc = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2"}
    alloc = allocation(salloc)
    assert alloc is not None and outside_step(salloc, alloc)  # salloc -N2's shell
    assert not outside_step({**salloc, "SLURM_STEP_NUM_NODES": "2"}, alloc)  # srun --ntasks-per-node=1
    one = {**salloc, "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"}
    assert not outside_step(one, allocation(one))  # a one-node allocation needs nothing else


def test_salloc_shell_dry_run_shows_the_srun_it_would_start(monkeypatch, capsys, tmp_path) -> None:  # noqa: ANN001
    from launcher.cli import main

    for k, v in {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_STEP_NUM_NODES", raising=False)
    assert main(["--gpus", "1", "--run-dir", str(tmp_path / "run"), "--dry-run", "trainer.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1" in out and "trainer.max_steps=3" in out
