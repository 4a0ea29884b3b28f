"""``--fault-tolerant`` on the torchrun backend: torchft's lighthouse plus one torchrun per replica group.

Every rank is a replica group of its own (torchft's DistributedDataParallel averages gradients across groups of
the same group rank, so data parallelism needs groups of one rank). Each group is its own torchrun with its own
``--max-restarts``: when a rank dies only its group restarts, heals from a live peer over the network and rejoins,
while the other groups never stop. The lighthouse forms the quorum of live groups each step; it is a process of
the run (``Cmd.service``), stopped with the rest.

Ranks get torchft's conventions, ``REPLICA_GROUP_ID``, ``NUM_REPLICA_GROUPS`` and ``TORCHFT_LIGHTHOUSE``, so a
user's own torchft program runs unmodified after ``--``; the built-in trainer uses them through
:mod:`workers.distributed.ft`.
"""

from __future__ import annotations

import errno
import importlib.util
import itertools
import shutil
import socket
from dataclasses import replace
from pathlib import Path

from launcher.plan.ssh import ssh_node
from launcher.plan.types import Cmd, LaunchPlan
from launcher.supervise.procs import TOKEN_VAR
from workers import contract

# The lighthouse's clocks, chosen so that a healthy group stalls <= 1 s after a peer's SIGKILL on a 2-core
# machine (0.55 s measured): a missed heartbeat for 500 ms drops a group from the quorum; a quorum waits
# 200 ms for groups that heartbeat but have not asked yet, and is re-checked every 50 ms.
HEARTBEAT_TIMEOUT_MS = 500
JOIN_TIMEOUT_MS = 200
QUORUM_TICK_MS = 50
INSTALL_HINT = "pip install torchft  (PyPI wheels for Linux x86-64; bash scripts/setup.sh installs it)"


def lighthouse_binary(python: str) -> str:
    """The ``torchft_lighthouse`` that torchft's wheel installs beside the interpreter (else the one on PATH)."""
    beside = Path(python).parent / "torchft_lighthouse"
    return str(beside) if Path(python).is_absolute() and beside.exists() else "torchft_lighthouse"


def lighthouse_command(plan: LaunchPlan) -> Cmd:
    return Cmd(argv=(lighthouse_binary(plan.python), "--min_replicas", "1", "--bind", f"[::]:{plan.lighthouse_port}",
                     "--heartbeat_timeout_ms", str(HEARTBEAT_TIMEOUT_MS),
                     "--join_timeout_ms", str(JOIN_TIMEOUT_MS), "--quorum_tick_ms", str(QUORUM_TICK_MS)),
               # the run's token: should the launcher die, its watchdog stops the lighthouse too
               env={"RUST_LOG": "warn", **{k: v for k, v in plan.env.items() if k == TOKEN_VAR}},
               name="lighthouse", service=True)


def group_command(plan: LaunchPlan, group: int, slot: int, host: str | None = None, attempt: int = 0) -> Cmd:
    """Replica group ``group``: a torchrun of one rank on ``host`` (over ssh; None: here), using the host's GPU
    ``slot``. ``attempt``: the group's attempts before this torchrun (its host was lost and it is started again),
    so its records go on from there instead of writing over attempt 0's."""
    argv = (plan.python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
            "--max-restarts", str(plan.max_restarts), "--log-dir", str(plan.run_dir / "logs" / f"group{group}"),
            "--tee", "3",
            # on a hostfile's host: the address its torchrun's store is reached by (MASTER_ADDR, which the Manager
            # advertises when its group leads a quorum), not the hostname, which need not resolve elsewhere
            *(("--local-addr", host) if host else ()), *plan.rank_program)
    # a hostfile's gpus= for the host, else its GPUs in order
    pinned = contract.devices_by_host(plan.env.get(contract.DEVICES_ENV, "")).get(host or "", "")
    gpu = pinned.split(",")[slot] if pinned else str(slot)
    own = {contract.REPLICA_GROUP_ENV: str(group), **({contract.HOST_ENV: host} if host else {}),
           # each group's rank is rank 0 of its torchrun: its own records, and its own GPU
           contract.RUN_DIR_ENV: str(contract.group_dir(plan.run_dir, group))}
    env = {**{k: v for k, v in plan.env.items() if k != contract.DEVICES_ENV}, **own,
           "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]:",
           contract.NUM_REPLICA_GROUPS_ENV: str(plan.world_size),
           contract.LIGHTHOUSE_ENV: f"http://{plan.master_addr}:{plan.lighthouse_port}",
           "RUST_LOG": "warn",  # torchft's manager logs every quorum at INFO
           **({contract.ATTEMPT_ENV: str(attempt)} if attempt else {}),
           **({"CUDA_VISIBLE_DEVICES": gpu} if plan.device == "cuda" else {})}
    cmd = Cmd(argv=argv, env=env, name=f"group{group}", rank_marker=plan.rank_marker)
    if host is None:
        return cmd
    remote = ssh_node(plan, host, cmd)
    # the launcher's group watch reads the group's records (a shared filesystem); ssh's own env is local
    return replace(remote, name=cmd.name, env={**remote.env, **own})


def placement(plan: LaunchPlan) -> list[tuple[int, str | None, int]]:
    """(group, host, slot) of each replica group this launcher starts: on every host of a hostfile (ssh fan-out),
    else on this node (one launcher per node: node N's groups follow those of nodes 0..N-1)."""
    if plan.hosts:
        starts = itertools.accumulate((n for _, n in plan.hosts[:-1]), initial=0)  # each host's first group
        return [(start + slot, host, slot) for start, (host, n) in zip(starts, plan.hosts, strict=True)
                for slot in range(n)]
    first = plan.node_rank * plan.nproc_per_node
    return [(first + slot, None, slot) for slot in range(plan.nproc_per_node)]


def build_commands(plan: LaunchPlan) -> list[Cmd]:
    """The lighthouse (on the first host; in per-node mode on node 0) and one torchrun per replica group."""
    lighthouse = lighthouse_command(plan)
    services = ([ssh_node(plan, plan.hosts[0][0], lighthouse)] if plan.hosts else
                [lighthouse] if plan.node_rank == 0 else [])
    services = [replace(s, name="lighthouse", service=True, rank_marker="") for s in services]
    return services + [group_command(plan, g, slot, host) for g, host, slot in placement(plan)]


def check(plan: LaunchPlan) -> str | None:
    """What stops a fault-tolerant run from starting (checked before anything is spawned), or None."""
    if importlib.util.find_spec("torchft") is None:
        return f"--fault-tolerant needs torchft, which is not installed. HINT: {INSTALL_HINT}"
    binary = lighthouse_binary(plan.python)
    if shutil.which(binary) is None:  # on a hostfile's first host too: they share the filesystem
        return f"torchft's lighthouse ({binary}) is missing. HINT: {INSTALL_HINT}"
    if plan.hosts or plan.node_rank != 0:
        return None  # the lighthouse runs on another host (node 0): should its port be taken, it says so there
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
        # as a server binds (the lighthouse too): connections of an earlier run in TIME_WAIT do not count
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("::" if socket.has_ipv6 else "", plan.lighthouse_port))
            s.listen()
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return (f"the lighthouse's port {plan.lighthouse_port} is in use (another fault-tolerant run?). "
                        f"HINT: --lighthouse-port {plan.lighthouse_port + 1}")
            raise
    return None
