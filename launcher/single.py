"""One run from parsed arguments: plan, checks, run directory, supervision (or sbatch, or srun per node).

``python -m launcher`` (cli.py) parses and dispatches here; a sweep (sweep/multirun.py) runs each member through
:func:`run_one`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from launcher.args import parse_hostfile
from launcher.backends import get_backend, torchft
from launcher.backends.horovodrun import check_elastic
from launcher.config import cache as compose_cache
from launcher.config import resume
from launcher.config.compose import DEFAULT_CONFIG_DIR, compose_config
from launcher.errors import UsageError
from launcher.plan.planner import plan_launch
from launcher.plan.ssh import check_hosts
from launcher.plan.types import LaunchOptions
from launcher.slurm import env as slurm_env
from launcher.supervise import job
from launcher.supervise.procs import TOKEN_VAR
from workers import contract
from workers.ports import free_port

# wall-clock times of the launcher's own start-up, phase by phase (record_startup)
STARTUP: dict[str, float] = {}


def job_token(env: Mapping[str, str]) -> str:
    """The run's LAUNCHER_JOB_TOKEN: the caller's own (a test that looks for the run's processes by it), else a
    fresh one. Not one inherited from another run's rank (LAUNCHER_RUN_DIR set too): this run's watchdog would
    stop that run as well."""
    given = env.get(TOKEN_VAR, "")
    return given if given and contract.RUN_DIR_ENV not in env else uuid.uuid4().hex


def cuda_device_count() -> int:
    # no NVIDIA device node: no CUDA, and no need to pay torch's import time before starting anything
    if not (list(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/dxg").exists()):  # dxg: WSL2's GPUs
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_dir_of(args: argparse.Namespace) -> Path:
    """--run-dir, else RUNS_ROOT/NAME, else RUNS_ROOT/<timestamp>; absolute."""
    return (args.run_dir or args.runs_root / (args.name or time.strftime("%Y%m%d-%H%M%S"))).resolve()


def split_nodes(args: argparse.Namespace) -> None:
    """``--nodes MIN:MAX`` -> args.min_nodes, args.nodes (MAX); plain ``--nodes N`` -> both N."""
    if isinstance(args.nodes, tuple) or not hasattr(args, "min_nodes"):
        args.min_nodes, args.nodes = args.nodes if isinstance(args.nodes, tuple) else (args.nodes, args.nodes)


def options_from_args(args: argparse.Namespace, program: list[str],
                      env: Mapping[str, str] | None = None) -> LaunchOptions:
    split_nodes(args)
    alloc = slurm_env.allocation(env or {})
    hosts = args.hosts.split(",") if args.hosts else []
    if alloc is not None and args.backend != "torchrun" and not hosts and args.hostfile is None:
        # mpirun/horovodrun run once, on the first node, and start ranks on every node of the job
        slurm_env.check_flags(alloc, args.nodes, None, None)
        hosts, args.master_addr = list(alloc.hosts), args.master_addr or alloc.master_addr
    elif alloc is not None:  # inside sbatch/salloc: the job shape comes from Slurm, flags must agree
        slurm_env.check_flags(alloc, args.nodes, args.node_rank, args.master_addr)
        args.nodes, args.node_rank, args.master_addr = alloc.nodes, alloc.node_rank, alloc.master_addr
        args.master_port = args.master_port or alloc.master_port
    if args.hostfile is not None:
        hosts += parse_hostfile(args.hostfile)
    return LaunchOptions(
        backend=args.backend, nodes=1 if args.nodes is None else args.nodes, gpus=args.gpus,
        min_nodes=args.min_nodes if args.min_nodes != args.nodes else None,
        node_rank=args.node_rank,
        master_addr=args.master_addr, master_port=args.master_port, hosts=tuple(hosts),
        controller=args.controller, network_interface=args.network_interface, timeline=args.timeline,
        fusion_threshold_mb=args.fusion_threshold_mb, cycle_time_ms=args.cycle_time_ms,
        max_restarts=args.max_restarts, run_dir=run_dir_of(args), program=tuple(program),
        restart_backoff=args.restart_backoff,
        timeouts=(args.init_timeout, args.hang_timeout, args.checkpoint_timeout),
        # the same on every node, however many seconds apart they start
        job_id=args.name or (alloc.job_id if alloc else "launcher"),
        workdir=Path.cwd(), ssh_config=args.ssh_config, ssh_timeout=args.ssh_timeout,
        fault_tolerant=args.fault_tolerant, lighthouse_port=args.lighthouse_port,
    )


def srun_each_node(alloc: slurm_env.Allocation, args: argparse.Namespace) -> int:
    """Inside ``salloc -N2`` (no srun step): start this very command on every node of the allocation."""
    argv = slurm_env.srun_argv(alloc, sys.executable, args.raw_argv)
    if args.dry_run:
        print(f"launcher: dry run; a {alloc.nodes}-node Slurm allocation outside srun: would run\n  {shlex.join(argv)}")
        return 0
    if shutil.which("srun") is None:
        raise UsageError(f"inside a {alloc.nodes}-node Slurm allocation but not in an srun step, and srun is not on "
                         f"PATH. HINT: {shlex.join(argv)}")
    print(f"launcher: {alloc.nodes}-node Slurm allocation outside srun: starting one launcher per node with srun",
          flush=True)
    # the launcher per node takes nodes, node rank and master from SLURM_*; the master as the templates find it
    addr = os.environ.get("MASTER_ADDR") or slurm_env.node_addr(alloc.hosts[0]) or alloc.hosts[0]
    os.execvpe(argv[0], argv, {**os.environ, "MASTER_ADDR": addr})


def run_one(args: argparse.Namespace, program: list[str], cfg: object | None = None) -> int:
    """One run from parsed arguments: a sweep member too (sweep/multirun.py), with its config composed already."""
    if cfg is None and not program:
        cfg = compose_config(args.overrides, args.config_dir, cache=compose_cache.directory(os.environ))
        STARTUP["composed"] = time.time()
    if args.slurm:
        return slurm_job(args, program)
    if args.wait:
        raise UsageError("--wait only applies to --slurm")
    opts = options_from_args(args, program, os.environ)  # inside Slurm: checks the flags against the job
    alloc = slurm_env.allocation(os.environ)
    if alloc is not None and args.backend == "torchrun" and slurm_env.outside_step(os.environ, alloc):
        return srun_each_node(alloc, args)
    plan = plan_launch(opts, device_count=cuda_device_count(), free_port=free_port(),
                       cpu_count=os.cpu_count() or 1, python=sys.executable, env=os.environ,
                       is_root=os.geteuid() == 0, job_token=job_token(os.environ))
    history = resume.check(plan.run_dir, cfg, args.no_resume) if cfg is not None else None
    if args.dry_run:
        print("launcher: dry run, nothing started\n" + job.describe(plan))
        return 0
    if plan.fault_tolerant and getattr(cfg, "mode", None) == "online":
        raise UsageError("--fault-tolerant trains in batch mode only: a stream position cannot be healed from a "
                         "peer. HINT: drop --fault-tolerant, or mode=batch")
    problem = get_backend(plan.backend).check_available() or (
        torchft.check(plan) if plan.fault_tolerant and plan.backend == "torchrun" else
        check_elastic(plan) if plan.fault_tolerant else None)
    if problem:
        raise UsageError(problem)
    alloc = slurm_env.allocation(os.environ)
    if alloc is not None:
        print(f"launcher: Slurm job {alloc.job_id}, restart count {alloc.restart_count}, node {alloc.node_rank} of "
              f"{alloc.nodes}", flush=True)
    if args.preflight:
        from launcher.preflight import checks as preflight

        if code := preflight.gate(plan, os.environ):  # a failing or slow host: nothing starts
            return code
    remote_hosts = [h for h, _ in plan.hosts if h not in ("localhost", "127.0.0.1")]
    if remote_hosts and alloc is None:  # before anything starts: every host answers over ssh (Slurm: srun)
        check_hosts(remote_hosts, config=plan.ssh_config, timeout=plan.ssh_timeout, workdir=plan.workdir,
                    python=plan.python)
    STARTUP["planned"] = time.time()
    try:
        return job.launch(plan, cfg, fresh=args.no_resume, history=history)
    finally:
        if plan.node_rank == 0:
            record_startup(plan.run_dir)


def record_startup(run_dir: Path) -> None:
    """RUN_DIR/startup.json: when the launcher had parsed its arguments, composed the config (and checked the
    user's targets), made the plan (and its pre-flight checks), and written the run directory — ``spawned``,
    plan.json's time: the runner starts right after it. ``python -m bench overhead`` prints the phases."""
    with contextlib.suppress(OSError):  # a report, not part of the run
        marks = {**STARTUP, "spawned": contract.plan_file(run_dir).stat().st_mtime}
        (run_dir / "startup.json").write_text(json.dumps(marks, indent=1))


def slurm_job(args: argparse.Namespace, program: list[str], array: str | None = None) -> int:
    """Render the matching slurm/ template for these arguments and submit it (or print it: --dry-run).
    ``array``: a sweep's ``0-N%K`` (launcher/sweep/multirun.py); the run directory is then the sweep's."""
    from launcher.slurm import submit as slurm_submit

    run_dir = run_dir_of(args)
    forwarded = [*args.overrides, *(["--max-restarts", str(args.max_restarts)] if args.max_restarts else []),
                 *(["--config-dir", str(args.config_dir)] if args.config_dir != DEFAULT_CONFIG_DIR else []),
                 *(["--controller", args.controller] if args.backend == "horovod" else []),
                 *(["--", *program] if program else [])]
    opts = slurm_submit.SlurmOptions(
        nodes=args.nodes or 1, gpus_per_node=args.gpus or 1,
        request_gpus=slurm_submit.cluster_has_gpus(args.partition), job_name=args.name or "launcher",
        partition=args.partition, time=args.time, account=args.account, qos=args.qos, constraint=args.constraint,
        cpus_per_task=args.cpus_per_task, signal_s=args.usr1_before, extra_sbatch=tuple(args.sbatch),
        setup=tuple(args.setup), run_dir=run_dir, python=sys.executable, args=tuple(forwarded), backend=args.backend,
        array=array)
    script = slurm_submit.render(slurm_submit.template_for(args.backend).read_text(), opts)
    if args.dry_run:
        print(f"launcher: dry run, nothing submitted; the sbatch script:\n{script}", end="")
        return 0
    if not opts.request_gpus:
        print(f"launcher: the cluster has no GPU GRES: asking for CPUs only, {opts.gpus_per_node} CPU rank(s) per "
              "node on gloo")
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.sbatch"
    path.write_text(script)
    path.chmod(0o755)
    _, code = slurm_submit.submit(path, wait=args.wait)
    return code
