"""The plan's types: what the user asked for, the job it becomes, and the commands that start it.

Their own module, so backends/ and ssh.py (which build commands) need not import plan.py (which
calls them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from workers import contract


@dataclass(frozen=True, kw_only=True)
class Cmd:
    """One process the supervisor starts: an argv list (never a shell string) plus env additions."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    name: str = "node0"  # prefix for this command's console lines when there are several
    rank_marker: str = ""  # an argv element only the rank processes have (their program), for SIGUSR1
    remote: bool = False  # runs on another host over ssh; stdin is its control channel (launcher.supervise.node)
    relabel: tuple[str, ...] = ()  # (regex, replacement): the runner's rank tag on a line -> "[rankN]:"
    service: bool = False  # serves the others (torchft's lighthouse): not waited for, stopped when they end


@dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    """What the user asked for (the CLI's parse result)."""

    backend: str = "torchrun"
    nodes: int = 1
    min_nodes: int | None = None  # elastic (--nodes MIN:MAX): the job goes on while this many nodes remain
    gpus: int | None = None  # ranks per node; None = all CUDA devices, or 1 CPU rank
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None
    hosts: tuple[str, ...] = ()  # horovod: host names (each gets --gpus slots) or host:slots
    controller: str = "gloo"  # horovod: gloo | mpi
    network_interface: str | None = None  # horovod: --network-interface
    timeline: str | None = None  # horovod: --timeline-filename
    fusion_threshold_mb: int | None = None  # horovod tuning
    cycle_time_ms: float | None = None  # horovod tuning
    max_restarts: int = 0
    restart_backoff: float = 1.0  # seconds from a failure to its restart (workers/rank.py: backoff_ends)
    timeouts: tuple[float, float, float] = (900.0, 300.0, 900.0)  # hang watch: init, step, checkpoint
    job_id: str = "launcher"  # rendezvous id: the same on every node (a run name, a Slurm job id)
    run_dir: Path
    workdir: Path = Path("/")  # where remote nodes start (ssh fan-out): the launcher's working directory
    ssh_config: Path | None = None  # ssh -F FILE for the fan-out and the reachability check
    ssh_timeout: int = 10  # seconds: ssh ConnectTimeout
    program: tuple[str, ...] = ()  # `-- script.py args` (or `-- -m module args`); () = built-in trainer
    fault_tolerant: bool = False  # torchft: one replica group per rank, survivors go on (launcher/backends/torchft.py)
    lighthouse_port: int = 29510  # torchft's lighthouse, on this node


@dataclass(frozen=True, kw_only=True)
class LaunchPlan:
    backend: str
    device: str  # cuda | cpu: NCCL on cuda, gloo on cpu
    nnodes: int
    min_nodes: int  # == nnodes unless elastic
    nproc_per_node: int
    world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    hosts: tuple[tuple[str, int], ...]  # (host, slots); empty in per-node mode
    controller: str
    run_dir: Path
    program: tuple[str, ...]  # what each rank runs, as an argv after the interpreter
    python: str
    env: Mapping[str, str]  # added to every rank's environment
    max_restarts: int
    timeouts: tuple[float, float, float] = (900.0, 300.0, 900.0)  # hang watch: init, step, checkpoint (0: off)
    attempt: int = 0  # the launcher's restart count (runners other than torchrun: the launcher restarts them)
    job_id: str = "launcher"
    workdir: Path = Path("/")
    ssh_config: Path | None = None
    ssh_timeout: int = 10
    forwarded_env: Mapping[str, str] = field(default_factory=dict)  # the launcher's env that remote ranks get
    tuning: Mapping[str, str] = field(default_factory=dict)  # backend-specific pass-through options
    flags: Mapping[str, bool] = field(default_factory=dict)  # as_root, oversubscribe (mpirun)
    fault_tolerant: bool = False
    lighthouse_port: int = 29510
    commands: tuple[Cmd, ...] = ()

    @property
    def builtin(self) -> bool:
        return self.program[:3] == ("-m", contract.TRAINER_MODULE, "--run-dir")

    @property
    def elastic(self) -> bool:
        return self.min_nodes < self.nnodes

    @property
    def rank_program(self) -> tuple[str, ...]:
        """What each rank runs: the built-in trainer reports to the launcher itself (workers/rank.py); any
        other program runs under that module's wrapper, in the same process, unmodified."""
        return self.program if self.builtin else ("-m", contract.RANK_MODULE, *self.program)

    @property
    def rank_marker(self) -> str:
        """The module or script every rank runs: how rank processes are told from runners and shells."""
        return self.program[1] if self.program[0] == "-m" else self.program[0]
