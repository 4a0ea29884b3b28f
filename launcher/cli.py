"""Command line: parse -> compose config -> plan -> run directory -> supervise. See launcher/__init__.py."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from launcher import __doc__ as MANUAL
from launcher import compose_cache, job, resume, slurm_env
from launcher.backends import backend_names, get_backend, torchft
from launcher.backends.horovodrun import check_elastic
from launcher.commands import LaunchOptions
from launcher.config import DEFAULT_CONFIG_DIR, compose_config
from launcher.errors import UsageError
from launcher.plan import plan_launch
from launcher.procs import TOKEN_VAR
from launcher.ssh import check_hosts


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}. HINT: python -m launcher --help")


def _number(kind: type, low: float, high: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: ``kind`` within [low, high]; anything else is a usage error naming the range."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not low <= value <= high or value != value:  # value != value: NaN
            allowed = f"at least {low:g}" if high == float("inf") else f"within {low:g}..{high:g}"
            raise argparse.ArgumentTypeError(f"{text} must be {allowed}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def NODES(text: str) -> int | tuple[int, int]:  # noqa: N802 - an argparse type, named like the others
    """``N`` or ``MIN:MAX`` (torchrun's --nnodes)."""
    low, colon, high = text.partition(":")
    if not colon:
        return COUNT(text)
    least, most = COUNT(low), COUNT(high)
    if least > most:
        raise argparse.ArgumentTypeError(f"{text}: MIN must not exceed MAX")
    return (least, most)


COUNT, INDEX, PORT, SECONDS = _number(int, 1), _number(int, 0), _number(int, 1, 65535), _number(float, 0)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launcher", description=MANUAL,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides, e.g. optimizer=sgd optimizer.lr=0.05")
    g = p.add_argument_group("job shape")
    g.add_argument("--nodes", type=NODES, default=None,
                   help="number of nodes (default 1; in Slurm: the allocation's), or MIN:MAX for an elastic job: a "
                        "node that dies is dropped and the others go on from the last checkpoint (torchrun)")
    g.add_argument("--gpus", type=COUNT, default=None,
                   help="ranks per node: one GPU each; CPU ranks on gloo when there is no CUDA "
                        "(default: all GPUs, or 1 CPU rank)")
    g.add_argument("--node-rank", "--node_rank", type=INDEX, default=None, help="this node's index (multi-node)")
    g.add_argument("--master-addr", "--master_addr", default=None, help="address of node 0 (multi-node)")
    g.add_argument("--master-port", "--master_port", type=PORT, default=None,
                   help="rendezvous port (default: a free port on one node, 29500 on several)")
    g.add_argument("--backend", default="torchrun", choices=backend_names(), help="default: torchrun")
    g.add_argument("--max-restarts", "--max_restarts", type=INDEX, default=0,
                   help="restart all ranks this many times after a failure (default 0: fail fast)")
    w = p.add_argument_group("hangs and restarts (seconds; 0 turns a check off)")
    w.add_argument("--hang-timeout", type=SECONDS, default=300,
                   help="a rank with no step (or eval batch) for this long is stuck: its stack and every other "
                        "rank's go to RUN_DIR/attempts/N/, the run stops or restarts (default 300)")
    w.add_argument("--init-timeout", type=SECONDS, default=900, help="start-up to the first step (default 900)")
    w.add_argument("--checkpoint-timeout", type=SECONDS, default=900, help="one checkpoint save (default 900)")
    w.add_argument("--restart-backoff", type=SECONDS, default=1.0,
                   help="wait before the first restart, doubled for each next one, at most 30 (default 1)")
    f = p.add_argument_group("training through failures (torchft; launcher/backends/torchft.py)")
    f.add_argument("--fault-tolerant", action="store_true",
                   help="one replica group per rank under torchft's lighthouse: when a rank dies the others go "
                        "on training; its group restarts alone (--max-restarts each, default 3) and heals from "
                        "a live peer. With --backend horovod: Horovod Elastic (the survivors go on at the smaller "
                        "size, a restarted worker is added back)")
    f.add_argument("--lighthouse-port", type=PORT, default=29510, help="torchft lighthouse port (default 29510)")
    s = p.add_argument_group("several hosts from this one (ssh fan-out; horovodrun and mpirun ssh themselves)")
    s.add_argument("--hosts", default=None, help="comma-separated hosts, NAME or NAME:SLOTS (default slots: --gpus)")
    s.add_argument("--hostfile", type=Path, default=None, help="'host slots=N' or 'host:N' per line")
    s.add_argument("--ssh-config", type=Path, default=None, help="ssh -F FILE (default: ~/.ssh/config)")
    s.add_argument("--ssh-timeout", type=COUNT, default=10, help="ssh connect timeout in seconds (default 10)")
    h = p.add_argument_group("horovod")
    h.add_argument("--controller", default="gloo", choices=("gloo", "mpi"), help="horovodrun controller")
    h.add_argument("--network-interface", default=None, help="horovodrun --network-interface")
    h.add_argument("--timeline", default=None, help="write a Horovod timeline to this file")
    h.add_argument("--fusion-threshold-mb", type=INDEX, default=None, help="Horovod tensor fusion buffer")
    h.add_argument("--cycle-time-ms", type=_number(float, 0.001), default=None, help="Horovod cycle time")
    sl = p.add_argument_group("Slurm submission (--slurm renders slurm/*.sbatch into the run directory, submits it)")
    sl.add_argument("--slurm", action="store_true", help="submit this job with sbatch instead of running it here")
    sl.add_argument("--wait", action="store_true", help="with --slurm: wait for the job; exit with its code")
    for flag, what in (("--partition", "partition"), ("--time", "time limit, [D-]HH:MM:SS"),
                       ("--account", "account"), ("--qos", "quality of service"), ("--constraint", "node features")):
        sl.add_argument(flag, default=None, help=f"sbatch {flag}: {what}")
    sl.add_argument("--cpus-per-task", type=COUNT, default=None, help="sbatch --cpus-per-task (one task per node)")
    sl.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                    help="one more #SBATCH option, e.g. --sbatch=--mem=64G (repeatable)")
    sl.add_argument("--setup", action="append", default=[], metavar="LINE",
                    help="a shell line run before training, e.g. --setup 'module load cuda' (repeatable)")
    sl.add_argument("--usr1-before", type=INDEX, default=120, metavar="S",
                    help="Slurm sends USR1 this many seconds before the time limit: checkpoint + requeue")
    m = p.add_argument_group("sweeps (Hydra multirun: a=1,2 b=x,y runs every combination; launcher/sweep.py)")
    m.add_argument("-m", "--multirun", action="store_true",
                   help="a sweep: one run per member in RUNS_ROOT/NAME/<member>/, with summary.csv")
    m.add_argument("--max-parallel", type=COUNT, default=None, metavar="K",
                   help="with --slurm: at most K array tasks at once (default: all)")
    m.add_argument("--objective", default=None, metavar="KEY",
                   help="what a sweeper plugin (hydra/sweeper=optuna) optimizes: a result.json key or train/loss "
                        "(default test/loss)")
    r = p.add_argument_group("run directory")
    r.add_argument("--run-dir", type=Path, default=None, help="default: RUNS_ROOT/NAME or RUNS_ROOT/<timestamp>")
    r.add_argument("--name", default=None, help="run name; rerunning a name resumes it")
    r.add_argument("--runs-root", type=Path, default=Path("runs"), help="default: ./runs")
    r.add_argument("--no-resume", action="store_true",
                   help="start at step 0; earlier checkpoints and TensorBoard files are moved aside, not deleted")
    r.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR, help="Hydra config directory")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands and env; start nothing")
    p.add_argument("--preflight", action="store_true",
                   help="first check every host (versions, GPUs, port, all-reduce bandwidth); exit 2 on a problem")
    return p


def parse_hostfile(path: Path) -> list[str]:
    """DeepSpeed/MPI 'host slots=N [gpus=0,2]' or horovod 'host:N' lines -> ['host:N', 'host:N@0,2', ...];
    '#' starts a comment. ``gpus=`` pins the GPUs that host's ranks use (CUDA_VISIBLE_DEVICES)."""
    if not path.is_file():
        raise UsageError(f"hostfile {path} does not exist")
    hosts = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        devices = ""
        if len(parts) == 3 and parts[2].startswith("gpus="):
            devices = parts.pop()[len("gpus="):]
            if not all(d.isdigit() for d in devices.split(",")):
                raise UsageError(f"{path}:{number}: bad gpus= in {raw.strip()!r}: expected GPU indices, e.g. gpus=0,2")
        name, colon, slots = parts[0].partition(":")
        if len(parts) == 2 and not colon and parts[1].startswith("slots="):
            colon, slots = ":", parts[1][len("slots="):]
        elif len(parts) != 1:
            name = ""
        if name and (not colon or slots.isdigit() and int(slots) > 0):
            hosts.append(f"{name}{colon}{slots}" + (f"@{devices}" if devices else ""))
        else:
            raise UsageError(f"{path}:{number}: bad hostfile line {raw.strip()!r}: expected 'host slots=N "
                             "[gpus=0,1]' or 'host:N'")
    if not hosts:
        raise UsageError(f"hostfile {path} lists no hosts")
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_token(env: Mapping[str, str]) -> str:
    """The run's LAUNCHER_JOB_TOKEN: the caller's own (a test that looks for the run's processes by it), else a
    fresh one. Not one inherited from another run's rank (LAUNCHER_RUN_DIR set too): this run's watchdog would
    stop that run as well."""
    given = env.get(TOKEN_VAR, "")
    return given if given and "LAUNCHER_RUN_DIR" not in env else uuid.uuid4().hex


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


def run(argv: list[str]) -> int:
    if argv[:1] == ["preflight"]:  # python -m launcher preflight [--hosts …]: launcher/preflight.py
        from launcher import preflight  # here, like slurm_submit: a plain launch does not pay for their imports

        return preflight.main(argv[1:], os.environ)
    program: list[str] = []
    raw = list(argv)  # as given: a launcher started again per node (srun) gets the same words
    if "--" in argv:
        cut = argv.index("--")
        argv, program = argv[:cut], argv[cut + 1 :]
        if not program:
            raise UsageError("nothing after `--`: expected `-- script.py args` or `-- -m module args`")
    args = build_parser().parse_intermixed_args(argv)
    STARTUP.clear()
    STARTUP["parsed"] = time.time()
    split_nodes(args)
    args.raw_argv = raw
    if program and args.overrides:
        raise UsageError(f"config overrides {args.overrides} apply to the built-in trainer only, "
                         "not to a script given after `--`")
    if program == ["-m"]:
        raise UsageError("`-- -m` needs a module: `-- -m package.module args`")
    if program and program[0] != "-m" and not Path(program[0]).is_file():
        raise UsageError(f"script {program[0]} not found (working directory: {Path.cwd()})")
    if args.multirun:
        from launcher import sweep  # it imports this module

        return sweep.run(args, program)
    if args.max_parallel or args.objective:
        raise UsageError("--max-parallel and --objective are for sweeps. HINT: add -m")
    return run_one(args, program)


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
    """One run from parsed arguments: a sweep member too (launcher/sweep.py), with its config composed already."""
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
        from launcher import preflight

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


# wall-clock times of the launcher's own start-up, phase by phase (record_startup)
STARTUP: dict[str, float] = {}


def record_startup(run_dir: Path) -> None:
    """RUN_DIR/startup.json: when the launcher had parsed its arguments, composed the config (and checked the
    user's targets), made the plan (and its pre-flight checks), and written the run directory — ``spawned``,
    plan.json's time: the runner starts right after it. ``python -m bench overhead`` prints the phases."""
    with contextlib.suppress(OSError):  # a report, not part of the run
        marks = {**STARTUP, "spawned": (run_dir / "plan.json").stat().st_mtime}
        (run_dir / "startup.json").write_text(json.dumps(marks, indent=1))


def slurm_job(args: argparse.Namespace, program: list[str], array: str | None = None) -> int:
    """Render the matching slurm/ template for these arguments and submit it (or print it: --dry-run).
    ``array``: a sweep's ``0-N%K`` (launcher/sweep.py); the run directory is then the sweep's."""
    from launcher import slurm_submit

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


def main(argv: list[str] | None = None) -> int:
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"launcher: error: {e}", file=sys.stderr)
        return e.exit_code
