"""torchrun's environment contract under mpirun, bootstrapped with mpi4py (``python -m workers.rank --mpi``):

    mpirun -np 4 ... python -m workers.rank --mpi -m workers.train --run-dir RUN_DIR
    mpirun -np 4 ... python -m workers.rank --mpi path/to/torchrun_script.py --its-args

Rank and world size come from MPI, the local rank from a shared-memory split of COMM_WORLD, and
rank 0 picks MASTER_ADDR/MASTER_PORT and broadcasts them; then the program runs as if torchrun had
started it (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT),
so torch.distributed starts with NCCL on GPUs or gloo on CPU and the same trainer runs.
"""

from __future__ import annotations

import os
import socket

from workers.ports import free_port


def _own_address() -> str:
    """An address the other hosts can reach: the one this host uses to route outwards."""
    host = socket.gethostname()
    try:
        return socket.gethostbyname(host)
    except OSError:
        return "127.0.0.1"


def torchrun_env() -> dict[str, str]:
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks sharing this host's memory
    leaders = world.Split(0 if node.Get_rank() == 0 else MPI.UNDEFINED, world.Get_rank())
    node_rank = leaders.Get_rank() if leaders != MPI.COMM_NULL else -1
    node_rank = node.bcast(node_rank, root=0)
    master = world.bcast((os.environ.get("MASTER_ADDR") or _own_address(),
                          int(os.environ.get("MASTER_PORT") or free_port())) if world.Get_rank() == 0 else None,
                         root=0)
    return {"RANK": str(world.Get_rank()), "WORLD_SIZE": str(world.Get_size()),
            "LOCAL_RANK": str(node.Get_rank()), "LOCAL_WORLD_SIZE": str(node.Get_size()),
            "GROUP_RANK": str(node_rank), "MASTER_ADDR": master[0], "MASTER_PORT": str(master[1])}

