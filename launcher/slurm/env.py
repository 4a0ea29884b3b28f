"""Inside a Slurm allocation: the job shape from SLURM_* variables (pure functions, no Slurm needed).

Like Lightning's SLURMEnvironment: the master is the first host of SLURM_JOB_NODELIST and the port
is derived from the job id (every node computes the same one without talking to the others).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from launcher.errors import UsageError


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, as ``scontrol show hostnames`` expands it.

    >>> expand_nodelist("node[1-3,07],gpu-a")
    ['node1', 'node2', 'node3', 'node07', 'gpu-a']
    """
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise UsageError(f"cannot read SLURM_JOB_NODELIST={nodelist!r}")
            hosts += [f"{prefix}{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)]
    return hosts


@dataclass(frozen=True)
class Allocation:
    job_id: str
    nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    hosts: tuple[str, ...] = ()
    restart_count: int = 0  # SLURM_RESTART_COUNT: how often the job was requeued


def allocation(env: Mapping[str, str]) -> Allocation | None:
    """The job shape when running inside a Slurm allocation (SLURM_JOB_ID set), else None."""
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        return None
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    if not hosts:
        raise UsageError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is empty. HINT: run the launcher under srun")
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", len(hosts))))
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else 15000 + int(re.sub(r"\D", "", job_id)[-4:] or 0)
    # MASTER_ADDR when set (slurm/*.sbatch export the first node's NodeAddr), else the first host's name
    master = env.get("MASTER_ADDR") or hosts[0]
    return Allocation(job_id, nodes, int(env.get("SLURM_NODEID", "0")), master, port, tuple(hosts),
                      int(env.get("SLURM_RESTART_COUNT", "0") or 0))


def outside_step(env: Mapping[str, str], alloc: Allocation) -> bool:
    """A multi-node allocation, but this process is not one task per node of a step: ``salloc -N2``'s shell,
    or the batch script itself. One launcher here would start one node's ranks, which would wait in the
    rendezvous for the others until it timed out."""
    return alloc.nodes > 1 and int(env.get("SLURM_STEP_NUM_NODES") or 0) < alloc.nodes


def node_addr(host: str) -> str | None:
    """The address Slurm itself reaches ``host`` at (NodeAddr; on most clusters its name), as the sbatch
    templates export MASTER_ADDR."""
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("NodeAddr=")), None)


def srun_argv(alloc: Allocation, python: str, argv: list[str]) -> list[str]:
    """The same launcher command, once per node of the allocation (what slurm/train.sbatch does)."""
    return ["srun", f"--nodes={alloc.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            python, "-m", "launcher", *argv]


def check_flags(alloc: Allocation, nodes: int | None, node_rank: int | None, master_addr: str | None) -> None:
    """Flags given inside an allocation must agree with it."""
    for flag, given, have in (("--nodes", nodes, alloc.nodes), ("--node-rank", node_rank, alloc.node_rank),
                              ("--master-addr", master_addr, alloc.master_addr)):
        if given is not None and given != have:
            raise UsageError(f"{flag} {given} but Slurm job {alloc.job_id} says {have}. HINT: drop {flag} inside "
                             "an allocation, or run outside it")
