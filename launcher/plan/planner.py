"""Launch planning: parsed options + facts about the machine -> the exact commands to run.

:func:`plan_launch` is a pure function: it starts nothing, reads no environment and writes no file,
so every plan can be tested (and printed by ``--dry-run``) without starting a process. Everything
impure it needs (CUDA device count, a free port, core count, the interpreter, the run's token) is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

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


@dataclass(frozen=True)
class _Shape:
    """How many ranks run where: the first stage of a plan."""

    gpus: int  # ranks per node (a host without slots gets this many)
    hosts: tuple[tuple[str, int], ...]  # (host, slots); empty in per-node mode
    devices: str  # the hosts' pinned GPUs, LAUNCHER_DEVICES: "host=0,2;…" ("" when none are)
    nodes: int
    least: int  # nodes the job goes on with (elastic: MIN of --nodes MIN:MAX; else == nodes)
    world: int
    node_rank: int

    @property
    def most_ranks(self) -> int:
        """The most ranks on one node: they share its cores."""
        return max((n for _, n in self.hosts), default=self.gpus)


def _shape(opts: LaunchOptions, device_count: int) -> _Shape:
    """Ranks per node, the hosts, the node count and this node's rank, checked against each other and the
    machine's CUDA devices."""
    gpus = opts.gpus if opts.gpus is not None else max(device_count, 1)
    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: need at least 1 rank per node")
    if device_count and gpus > device_count:
        raise UsageError(f"--gpus {gpus} but this machine has {device_count} CUDA device(s). "
                         f"HINT: --gpus {device_count}")
    if opts.nodes < 1:
        raise UsageError(f"--nodes {opts.nodes}: need at least 1 node")
    parsed = [parse_host(h, gpus) for h in opts.hosts]
    hosts = tuple((h, n) for h, n, _ in parsed)
    nodes = len(hosts) or opts.nodes
    if hosts and opts.nodes not in (1, nodes):
        raise UsageError(f"--nodes {opts.nodes} but {nodes} hosts given; drop --nodes or make them agree")
    node_rank = opts.node_rank if opts.node_rank is not None else 0
    if not 0 <= node_rank < nodes:
        raise UsageError(f"--node-rank {node_rank} is outside 0..{nodes - 1}")
    if nodes > 1 and not hosts and (opts.node_rank is None or opts.master_addr is None):
        raise UsageError(f"--nodes {nodes} needs --node-rank and --master-addr on each node (run the "
                         f"launcher once per node), e.g. --nodes {nodes} --node-rank 0 --master-addr node0")
    least = opts.min_nodes or nodes
    if least > nodes:
        raise UsageError(f"--nodes {least}:{nodes}: MIN must not exceed MAX ({nodes} host(s))")
    # each rank sets CUDA_VISIBLE_DEVICES from this at start (workers/rank.py): the same on every backend
    devices = ";".join(f"{h}={d}" for h, _, d in parsed if d)
    world = sum(slots for _, slots in hosts) if hosts else nodes * gpus
    return _Shape(gpus=gpus, hosts=hosts, devices=devices, nodes=nodes, least=least, world=world, node_rank=node_rank)


def _program(opts: LaunchOptions) -> tuple[str, ...]:
    """What each rank runs after the interpreter: the user's ``-- script.py …``/``-- -m module …``, else the
    built-in trainer."""
    if opts.program[:1] == ("-m",) and len(opts.program) < 2:
        raise UsageError("`-- -m` needs a module: `-- -m package.module args`")
    if opts.program and opts.program[0] != "-m" and not opts.program[0].endswith(".py"):
        raise UsageError(f"{opts.program[0]!r} is not a Python script: pass `-- script.py args` or "
                         "`-- -m package.module args`")
    return opts.program or ("-m", contract.TRAINER_MODULE, "--run-dir", str(opts.run_dir))


def _restarts(opts: LaunchOptions, backend: str, shape: _Shape) -> int:
    """Check that the backend can go on after a failure as asked (elastic, fault tolerant); the restart budget."""
    if shape.least != shape.nodes and backend != "torchrun":
        raise UsageError(f"--nodes {shape.least}:{shape.nodes} (elastic) needs the torchrun backend: horovodrun and "
                         "mpirun cannot continue without a node")
    if opts.fault_tolerant:
        if backend == "mpi":
            raise UsageError("--fault-tolerant needs --backend torchrun (torchft): MPI has no mode in which the "
                             "other ranks go on after one fails")
        if backend == "horovod" and shape.nodes > 1 and not shape.hosts:
            # one horovodrun starts every worker, on remote hosts over ssh: there is no launcher per node
            raise UsageError("--backend horovod --fault-tolerant runs one horovodrun for every host: give them with "
                             "--hostfile/--hosts (not --nodes/--node-rank). HINT: --hostfile FILE, 'host slots=N' "
                             "per line")
        if backend == "horovod" and opts.controller != "gloo":
            raise UsageError("--backend horovod --fault-tolerant runs Horovod Elastic, which needs the gloo "
                             "controller. HINT: drop --controller mpi")
    if opts.max_restarts < 0:
        raise UsageError(f"--max-restarts {opts.max_restarts}: must be >= 0")
    # elastic: a node's loss is a restart of the others at the smaller size, so some restarts must be allowed;
    # fault tolerant: a group that died comes back (within its own budget) while the others go on
    return opts.max_restarts or (3 if shape.least < shape.nodes or opts.fault_tolerant else 0)


def _worker_env(opts: LaunchOptions, shape: _Shape, env: Mapping[str, str], cpu_count: int,
                job_token: str | None) -> dict[str, str]:
    """What every rank gets added to its environment, on every backend."""
    pythonpath = resources.pythonpath(env)
    return {
        "PYTHONUNBUFFERED": "1",  # rank output reaches the console line by line
        **({"PYTHONPATH": pythonpath} if pythonpath else {}),  # `-m workers.train` works from any working directory
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", str(max(1, cpu_count // shape.most_ranks))),
        contract.RUN_DIR_ENV: str(opts.run_dir),
        **({TOKEN_VAR: job_token} if job_token else {}),
        contract.RESTART_BACKOFF_ENV: f"{opts.restart_backoff:g}",  # workers/rank.py waits it out on a restart
        **({contract.DEVICES_ENV: shape.devices} if shape.devices else {}),
    }


def plan_launch(opts: LaunchOptions, *, device_count: int, free_port: int, cpu_count: int,
                python: str, env: Mapping[str, str], is_root: bool = False,
                job_token: str | None = None) -> LaunchPlan:
    """Validate ``opts`` against the machine and build the plan (commands included). ``job_token``: the
    run's LAUNCHER_JOB_TOKEN, which every process of the run inherits (the reaper finds them by it)."""
    backend = get_backend(opts.backend)
    shape = _shape(opts, device_count)
    program = _program(opts)
    restarts = _restarts(opts, backend.name, shape)
    tuning = {k: str(v) for k, v in (("timeline-filename", opts.timeline),
                                      ("fusion-threshold-mb", opts.fusion_threshold_mb),
                                      ("cycle-time-ms", opts.cycle_time_ms),
                                      ("network-interface", opts.network_interface)) if v is not None}
    hosts, nodes = shape.hosts, shape.nodes
    plan = LaunchPlan(
        backend=backend.name, device="cuda" if device_count else "cpu", nnodes=nodes, min_nodes=shape.least,
        nproc_per_node=shape.gpus, world_size=shape.world, node_rank=shape.node_rank,
        master_addr=opts.master_addr or (hosts[0][0] if hosts else "127.0.0.1"),
        master_port=opts.master_port or (free_port if nodes == 1 else DEFAULT_MASTER_PORT),
        hosts=hosts, controller=opts.controller, run_dir=opts.run_dir, program=program,
        python=python, env=_worker_env(opts, shape, env, cpu_count, job_token), max_restarts=restarts,
        timeouts=opts.timeouts, job_id=opts.job_id, workdir=opts.workdir,
        ssh_config=opts.ssh_config, ssh_timeout=opts.ssh_timeout, forwarded_env=exported_env(env), tuning=tuning,
        flags={"as_root": is_root,
               "oversubscribe": shape.most_ranks > cpu_count},
        fault_tolerant=opts.fault_tolerant, lighthouse_port=opts.lighthouse_port,
    )
    return replace(plan, commands=tuple(backend.build_commands(plan)))
