"""Who am I in the job? Read once from the environment, then passed around as a value.

The launcher's env contract is torchrun's, so any script written for torchrun runs unmodified:

======================  ===================================================================
``RANK``                global rank, 0 .. WORLD_SIZE-1
``LOCAL_RANK``          rank on this node; on CUDA also the GPU index
``WORLD_SIZE``          number of ranks in the job
``LOCAL_WORLD_SIZE``    ranks on this node
``GROUP_RANK``          node rank (torchrun's name)
``MASTER_ADDR/PORT``    rendezvous address of rank 0's store
``TORCHELASTIC_RESTART_COUNT``  how often the ranks were restarted (RANK may change across restarts)
======================  ===================================================================

Under ``horovodrun`` (gloo controller) the same facts come as ``HOROVOD_RANK``, ``HOROVOD_SIZE``,
``HOROVOD_LOCAL_RANK``…, under ``mpirun`` as ``OMPI_COMM_WORLD_*``, and inside a Slurm step as
``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``. With none of these set the process is a
single-rank job (like nanoGPT's ``python train.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from workers.contract import ATTEMPT_ENV, RESTART_COUNT_ENV

# (launched_by, rank, world_size, local_rank, local_world_size, node_rank) variable names
_SOURCES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"),
    ("horovod", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE",
     "HOROVOD_CROSS_RANK"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_NODE_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_NODEID"),
)


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw.split("(")[0])  # SLURM_NTASKS_PER_NODE may read "2(x3)"
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launched_by: str = "single"
    restart_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DistEnv:
        for source, rank, size, local, local_size, node in _SOURCES:
            if rank in environ:
                world = _int(environ, size, 1)
                return cls(
                    rank=_int(environ, rank, 0),
                    world_size=world,
                    local_rank=_int(environ, local, 0),
                    local_world_size=_int(environ, local_size, world),
                    node_rank=_int(environ, node, 0),
                    master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                    master_port=_int(environ, "MASTER_PORT", 29500),
                    launched_by=source,
                    restart_count=_int(environ, RESTART_COUNT_ENV, _int(environ, ATTEMPT_ENV, 0)),
                )
        return cls()


def torchrun_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables, from whichever runner started this process (horovodrun's ``HOROVOD_*``, mpirun's
    ``OMPI_COMM_WORLD_*``), for the ones not set already: a script written for torchrun (``init_process_group``
    with ``env://``) runs unmodified under every backend. MASTER_ADDR/MASTER_PORT come from the launcher's plan,
    passed in the environment, the same for every rank."""
    env = DistEnv.from_env(environ)
    facts = {"RANK": env.rank, "WORLD_SIZE": env.world_size, "LOCAL_RANK": env.local_rank,
             "LOCAL_WORLD_SIZE": env.local_world_size, "GROUP_RANK": env.node_rank,
             "MASTER_ADDR": env.master_addr, "MASTER_PORT": env.master_port}
    return {k: str(v) for k, v in facts.items() if k not in environ}
