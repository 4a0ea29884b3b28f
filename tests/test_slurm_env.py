"""Slurm allocation detection: nodelist expansion and job shape from SLURM_* variables (no Slurm needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from launcher.errors import UsageError
from launcher.slurm_env import Allocation, allocation, check_flags, expand_nodelist


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


JOB = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1"}


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
