"""Launch planning: parsed options + facts about the machine -> the exact commands to run.

:func:`plan_launch` is a pure function: it starts nothing, reads no environment and writes no file,
so every plan can be tested (and printed by ``--dry-run``) without starting a process. Everything
impure it needs (CUDA device count, a free port, core count, the interpreter, the run's token) is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from launcher import resources
from launcher.backends import get_backend
from launcher.errors import UsageError
from launcher.plan.ssh import exported_env
from launcher.plan.types import LaunchOptions, LaunchPlan
from launcher.supervise.procs import TOKEN_VAR
from workers import contract

DEFAULT_MASTER_PORT = 29500  # torchrun's default; every node must agree on it, so no random port


def parse_host(entry: str, default_slots: int) -> tuple[str, int, str]:
    """'node1' -> ('node1', default_slots, ''); 'node1:4' -> ('node1', 4, ''); 'node1:2@0,2' -> ('node1', 2, '0,2'):
    the host's ranks use GPUs 0 and 2 (a hostfile's ``gpus=``)."""
    entry, _, devices = entry.partition("@")
    host, _, slots = entry.partition(":")
    if not host or (slots and not slots.isdigit()) or slots == "0":
        raise UsageError(f"bad host {entry!r}: expected NAME or NAME:SLOTS, e.g. node1:8")
    count = int(slots) if slots else default_slots
    if devices and len(devices.split(",")) != count:
        raise UsageError(f"host {host}: gpus={devices} names {len(devices.split(','))} GPU(s) for {count} rank(s): "
                         "one GPU per rank")
    return host, count, devices


def plan_launch(opts: LaunchOptions, *, device_count: int, free_port: int, cpu_count: int,
                python: str, env: Mapping[str, str], is_root: bool = False,
                job_token: str | None = None) -> LaunchPlan:
    """Validate ``opts`` against the machine and build the plan (commands included). ``job_token``: the
    run's LAUNCHER_JOB_TOKEN, which every process of the run inherits (the reaper finds them by it)."""
    backend = get_backend(opts.backend)
    gpus = opts.gpus if opts.gpus is not None else max(device_count, 1)
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: need at least 1 rank per node")
    if device_count and gpus > device_count:
        raise UsageError(f"--gpus {gpus} but this machine has {device_count} CUDA device(s). "
                         f"HINT: --gpus {device_count}")
    if opts.nodes < 1:
        raise UsageError(f"--nodes {opts.nodes}: need at least 1 node")
    if opts.max_restarts < 0:
        raise UsageError(f"--max-restarts {opts.max_restarts}: must be >= 0")
    parsed = [parse_host(h, gpus) for h in opts.hosts]
    hosts = tuple((h, n) for h, n, _ in parsed)
    # each rank sets CUDA_VISIBLE_DEVICES from this at start (workers/rank.py): the same on every backend
    devices = ";".join(f"{h}={d}" for h, _, d in parsed if d)
    nodes = len(hosts) or opts.nodes
    if hosts and opts.nodes not in (1, nodes):
        raise UsageError(f"--nodes {opts.nodes} but {nodes} hosts given; drop --nodes or make them agree")
    world = sum(slots for _, slots in hosts) if hosts else nodes * gpus
    node_rank = opts.node_rank if opts.node_rank is not None else 0
    if not 0 <= node_rank < nodes:
        raise UsageError(f"--node-rank {node_rank} is outside 0..{nodes - 1}")
    if nodes > 1 and not hosts and (opts.node_rank is None or opts.master_addr is None):
        raise UsageError(f"--nodes {nodes} needs --node-rank and --master-addr on each node (run the "
                         f"launcher once per node), e.g. --nodes {nodes} --node-rank 0 --master-addr node0")
    program = opts.program or ("-m", contract.TRAINER_MODULE, "--run-dir", str(opts.run_dir))
    if opts.program[:1] == ("-m",) and len(opts.program) < 2:
        raise UsageError("`-- -m` needs a module: `-- -m package.module args`")
    if opts.program and opts.program[0] != "-m" and not opts.program[0].endswith(".py"):
        raise UsageError(f"{opts.program[0]!r} is not a Python script: pass `-- script.py args` or "
                         "`-- -m package.module args`")
    least = opts.min_nodes or nodes
    if least != nodes and backend.name != "torchrun":
        raise UsageError(f"--nodes {least}:{nodes} (elastic) needs the torchrun backend: horovodrun and mpirun "
                         "cannot continue without a node")
    if least > nodes:
        raise UsageError(f"--nodes {least}:{nodes}: MIN must not exceed MAX ({nodes} host(s))")
    if opts.fault_tolerant:
        if backend.name == "mpi":
            raise UsageError("--fault-tolerant needs --backend torchrun (torchft): MPI has no mode in which the "
                             "other ranks go on after one fails")
        if nodes > 1 or least != nodes:
            raise UsageError("--fault-tolerant runs on one node for now (torchft: one replica group per rank; Horovod "
                             "Elastic: one host). HINT: drop --nodes/--hosts, or use --max-restarts across nodes")
        if backend.name == "horovod" and opts.controller != "gloo":
            raise UsageError("--backend horovod --fault-tolerant runs Horovod Elastic, which needs the gloo "
                             "controller. HINT: drop --controller mpi")
    # elastic: a node's loss is a restart of the others at the smaller size, so some restarts must be allowed;
    # fault tolerant: a group that died comes back (within its own budget) while the others go on
    restarts = opts.max_restarts or (3 if least < nodes or opts.fault_tolerant else 0)
    most_ranks = max((n for _, n in hosts), default=gpus)  # on one node: threads are shared by its ranks
    pythonpath = resources.pythonpath(env)
    worker_env = {
        "PYTHONUNBUFFERED": "1",  # rank output reaches the console line by line
        **({"PYTHONPATH": pythonpath} if pythonpath else {}),  # `-m workers.train` works from any working directory
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(max(1, cpu_count // most_ranks))),
        contract.RUN_DIR_ENV: str(opts.run_dir),
        **({TOKEN_VAR: job_token} if job_token else {}),
        contract.RESTART_BACKOFF_ENV: f"{opts.restart_backoff:g}",  # workers/rank.py waits it out on a restart
        **({contract.DEVICES_ENV: devices} if devices else {}),
    }
    tuning = {k: str(v) for k, v in (("timeline-filename", opts.timeline),
                                      ("fusion-threshold-mb", opts.fusion_threshold_mb),
                                      ("cycle-time-ms", opts.cycle_time_ms),
                                      ("network-interface", opts.network_interface)) if v is not None}
    plan = LaunchPlan(
        backend=backend.name, device="cuda" if device_count else "cpu", nnodes=nodes, min_nodes=least,
        nproc_per_node=gpus, world_size=world, node_rank=node_rank,
        master_addr=opts.master_addr or (hosts[0][0] if hosts else "127.0.0.1"),
        master_port=opts.master_port or (free_port if nodes == 1 else DEFAULT_MASTER_PORT),
        hosts=hosts, controller=opts.controller, run_dir=opts.run_dir, program=program,
        python=python, env=worker_env, max_restarts=restarts, timeouts=opts.timeouts,
        job_id=opts.job_id, workdir=opts.workdir,
        ssh_config=opts.ssh_config, ssh_timeout=opts.ssh_timeout, forwarded_env=exported_env(env), tuning=tuning,
        flags={"as_root": is_root,
               "oversubscribe": most_ranks > cpu_count},
        fault_tolerant=opts.fault_tolerant, lighthouse_port=opts.lighthouse_port,
    )
    return replace(plan, commands=tuple(backend.build_commands(plan)))
