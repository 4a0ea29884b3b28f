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
import shutil
import socket
from pathlib import Path

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


def build_commands(plan: LaunchPlan) -> list[Cmd]:
    lighthouse = Cmd(argv=(lighthouse_binary(plan.python), "--min_replicas", "1",
                           "--bind", f"[::]:{plan.lighthouse_port}",
                           "--heartbeat_timeout_ms", str(HEARTBEAT_TIMEOUT_MS),
                           "--join_timeout_ms", str(JOIN_TIMEOUT_MS), "--quorum_tick_ms", str(QUORUM_TICK_MS)),
                     # the run's token: should the launcher die, its watchdog stops the lighthouse too
                     env={"RUST_LOG": "warn", **{k: v for k, v in plan.env.items() if k == TOKEN_VAR}},
                     name="lighthouse", service=True)
    groups = plan.world_size
    commands = [lighthouse]
    for group in range(groups):
        argv = (plan.python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
                "--max-restarts", str(plan.max_restarts), "--log-dir", str(plan.run_dir / "logs" / f"group{group}"),
                "--tee", "3", *plan.rank_program)
        env = {**plan.env, "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]:",
               contract.REPLICA_GROUP_ENV: str(group), contract.NUM_REPLICA_GROUPS_ENV: str(groups),
               contract.LIGHTHOUSE_ENV: f"http://{plan.master_addr}:{plan.lighthouse_port}",
               # each group's rank is rank 0 of its torchrun: its own records, and its own GPU
               contract.RUN_DIR_ENV: str(contract.group_dir(plan.run_dir, group)),
               "RUST_LOG": "warn",  # torchft's manager logs every quorum at INFO
               **({"CUDA_VISIBLE_DEVICES": str(group)} if plan.device == "cuda" else {})}
        commands.append(Cmd(argv=argv, env=env, name=f"group{group}", rank_marker=plan.rank_marker))
    return commands


def check(plan: LaunchPlan) -> str | None:
    """What stops a fault-tolerant run from starting (checked before anything is spawned), or None."""
    if importlib.util.find_spec("torchft") is None:
        return f"--fault-tolerant needs torchft, which is not installed. HINT: {INSTALL_HINT}"
    if shutil.which(plan.commands[0].argv[0]) is None:
        return f"torchft's lighthouse ({plan.commands[0].argv[0]}) is missing. HINT: {INSTALL_HINT}"
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
