"""Command line: parse, then dispatch: one run (single.py), a sweep (sweep/), preflight (preflight/). See
launcher/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from launcher import __doc__ as MANUAL
from launcher.args import COUNT, INDEX, NODES, PORT, SECONDS, number, parse_hostfile
from launcher.backends import backend_names
from launcher.config.compose import DEFAULT_CONFIG_DIR
from launcher.errors import UsageError
from launcher.single import (
    STARTUP,
    cuda_device_count,
    free_port,
    job_token,
    options_from_args,
    run_dir_of,
    run_one,
    slurm_job,
    split_nodes,
)

__all__ = ["COUNT", "INDEX", "NODES", "PORT", "SECONDS", "build_parser", "cuda_device_count", "free_port",
           "job_token", "main", "options_from_args", "parse_hostfile", "run", "run_dir_of", "run_one", "slurm_job"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}. HINT: python -m launcher --help")


def _job_shape(p: argparse.ArgumentParser) -> None:
    """Nodes, ranks per node, rendezvous, backend, restarts."""
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


def _hangs(p: argparse.ArgumentParser) -> None:
    """The hang watch's timeouts and the restart backoff."""
    w = p.add_argument_group("hangs and restarts (seconds; 0 turns a check off)")
    w.add_argument("--hang-timeout", type=SECONDS, default=300,
                   help="a rank with no step (or eval batch) for this long is stuck: its stack and every other "
                        "rank's go to RUN_DIR/attempts/N/, the run stops or restarts (default 300)")
    w.add_argument("--init-timeout", type=SECONDS, default=900, help="start-up to the first step (default 900)")
    w.add_argument("--checkpoint-timeout", type=SECONDS, default=900, help="one checkpoint save (default 900)")
    w.add_argument("--restart-backoff", type=SECONDS, default=1.0,
                   help="wait after a failure before the restart, doubled for each restart before it, in a row, that "
                        "failed before its first step, at most 30 (default 1)")


def _fault_tolerance(p: argparse.ArgumentParser) -> None:
    """--fault-tolerant: torchft, or Horovod Elastic."""
    f = p.add_argument_group("training through failures (torchft; launcher/backends/torchft.py)")
    f.add_argument("--fault-tolerant", action="store_true",
                   help="one replica group per rank under torchft's lighthouse: when a rank dies the others go "
                        "on training; its group restarts alone (--max-restarts each, default 3) and heals from "
                        "a live peer. With --backend horovod: Horovod Elastic (the survivors go on at the smaller "
                        "size, a restarted worker is added back)")
    f.add_argument("--lighthouse-port", type=PORT, default=29510, help="torchft lighthouse port (default 29510)")


def _hosts(p: argparse.ArgumentParser) -> None:
    """Several hosts started from this one over ssh."""
    s = p.add_argument_group("several hosts from this one (ssh fan-out; horovodrun and mpirun ssh themselves)")
    s.add_argument("--hosts", default=None, help="comma-separated hosts, NAME or NAME:SLOTS (default slots: --gpus)")
    s.add_argument("--hostfile", type=Path, default=None, help="'host slots=N' or 'host:N' per line")
    s.add_argument("--ssh-config", type=Path, default=None, help="ssh -F FILE (default: ~/.ssh/config)")
    s.add_argument("--ssh-timeout", type=COUNT, default=10, help="ssh connect timeout in seconds (default 10)")


def _horovod(p: argparse.ArgumentParser) -> None:
    """horovodrun's own options."""
    h = p.add_argument_group("horovod")
    h.add_argument("--controller", default="gloo", choices=("gloo", "mpi"), help="horovodrun controller")
    h.add_argument("--network-interface", default=None, help="horovodrun --network-interface")
    h.add_argument("--timeline", default=None, help="write a Horovod timeline to this file")
    h.add_argument("--fusion-threshold-mb", type=INDEX, default=None, help="Horovod tensor fusion buffer")
    h.add_argument("--cycle-time-ms", type=number(float, 0.001), default=None, help="Horovod cycle time")


def _slurm(p: argparse.ArgumentParser) -> None:
    """--slurm: what the sbatch script asks for."""
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


def _sweeps(p: argparse.ArgumentParser) -> None:
    """-m: Hydra multirun."""
    m = p.add_argument_group("sweeps (Hydra multirun: a=1,2 b=x,y runs every combination; launcher/sweep/multirun.py)")
    m.add_argument("-m", "--multirun", action="store_true",
                   help="a sweep: one run per member in RUNS_ROOT/NAME/<member>/, with summary.csv")
    m.add_argument("--max-parallel", type=COUNT, default=None, metavar="K",
                   help="with --slurm: at most K array tasks at once (default: all)")
    m.add_argument("--objective", default=None, metavar="KEY",
                   help="what a sweeper plugin (hydra/sweeper=optuna) optimizes: a result.json key or train/loss "
                        "(default test/loss)")


def _run_dir(p: argparse.ArgumentParser) -> None:
    """Where the run lives, and resuming it."""
    r = p.add_argument_group("run directory")
    r.add_argument("--run-dir", type=Path, default=None, help="default: RUNS_ROOT/NAME or RUNS_ROOT/<timestamp>")
    r.add_argument("--name", default=None, help="run name; rerunning a name resumes it")
    r.add_argument("--runs-root", type=Path, default=Path("runs"), help="default: ./runs")
    r.add_argument("--no-resume", action="store_true",
                   help="start at step 0; earlier checkpoints and TensorBoard files are moved aside, not deleted")
    r.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR, help="Hydra config directory")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launcher", description=MANUAL,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="Hydra overrides, e.g. optimizer=sgd optimizer.lr=0.05")
    for add_group in (_job_shape, _hangs, _fault_tolerance, _hosts, _horovod, _slurm, _sweeps, _run_dir):
        add_group(p)
    p.add_argument("--dry-run", action="store_true", help="print the exact commands and env; start nothing")
    p.add_argument("--preflight", action="store_true",
                   help="first check every host (versions, GPUs, port, all-reduce bandwidth); exit 2 on a problem")
    return p


def run(argv: list[str]) -> int:
    if argv[:1] == ["preflight"]:  # python -m launcher preflight [--hosts …]: launcher/preflight/checks.py
        # imported here, like the Slurm and sweep modules: a plain launch does not pay for their imports
        from launcher.preflight import checks as preflight

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
        from launcher.sweep import multirun as sweep

        sweep.check_multirun(args, program)
        sweeper = sweep.sweeper_choice(args.overrides)
        if sweeper not in (None, "basic"):  # a Hydra sweeper plugin drives it
            from launcher.sweep import plugin as sweep_plugin

            return sweep_plugin.run(args, sweeper, run_dir_of(args))
        return sweep.run(args)
    if args.max_parallel or args.objective:
        raise UsageError("--max-parallel and --objective are for sweeps. HINT: add -m")
    return run_one(args, program)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except UsageError as e:
        print(f"launcher: error: {e}", file=sys.stderr)
        return e.exit_code
