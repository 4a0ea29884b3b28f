"""Distributed wing: env.py (the rank's environment, read once), comm.py (the Comm interface every backend
implements), ddp.py, horovod.py, ft.py (torchft), elastic.py (Horovod Elastic), mpi_env.py (the mpi4py
bootstrap), topology.py (where each rank runs, checked before training); :func:`build_comm` picks one.

May import: workers.contract, workers.config, workers.events, workers.files, workers.table, workers.ports;
never the trainer or launcher/."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from workers import contract

if TYPE_CHECKING:  # torch is imported when a Comm is built, not by `workers.distributed.env` (workers/rank.py reads it)
    from workers.config import DDPConfig
    from workers.distributed.comm import Comm
    from workers.distributed.env import DistEnv


def build_comm(kind: str, env: DistEnv, ddp: DDPConfig | None = None, environ: Mapping[str, str] | None = None,
               commit_every: int = 10) -> Comm:
    """``kind``: auto | ddp | horovod | torchft. ``auto`` means DDP for several ranks, else a single process; under
    the launcher's ``--fault-tolerant`` (TORCHFT_LIGHTHOUSE in ``environ``) it means torchft. ``horovod`` under
    horovodrun's elastic mode (HOROVOD_ELASTIC=1) is Horovod Elastic, committing every ``commit_every`` steps."""
    from workers.distributed.ddp import DDPComm, SingleProcessComm

    environ = environ or {}
    if kind == "torchft" or (kind == "auto" and contract.LIGHTHOUSE_ENV in environ):
        from workers.distributed.ft import FTComm  # lazy: torchft is needed by --fault-tolerant runs only

        return FTComm(env, environ)

    if kind == "horovod" and environ.get("HOROVOD_ELASTIC") == "1":  # horovodrun in elastic mode
        from workers.distributed.elastic import ElasticComm

        run_dir = Path(environ[contract.RUN_DIR_ENV]) if contract.RUN_DIR_ENV in environ else None
        return ElasticComm(commit_every, run_dir, environ.get("HOROVOD_HOSTNAME", ""),
                           int(environ.get(contract.MAX_RESTARTS_ENV, "3")),
                           attempt=int(environ.get(contract.ATTEMPT_ENV) or 0))  # the launcher's horovodrun start
    if kind == "horovod":
        from workers.distributed.horovod import HorovodComm  # lazy: horovod is an optional extra

        return HorovodComm()
    if kind == "ddp" or (kind == "auto" and env.world_size > 1):
        return DDPComm(env, ddp)
    if kind == "auto":
        return SingleProcessComm(env)
    raise ValueError(f"unknown comm {kind!r}: expected auto | ddp | horovod | torchft")
