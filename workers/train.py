"""Worker entry point: one rank of a data-parallel training job.

Started by the launcher (through torchrun, horovodrun or mpirun) as::

    python -m workers.train --run-dir RUN_DIR [--comm auto|ddp|horovod]

It reads ``RUN_DIR/config.yaml`` (written by the launcher, so every rank trains the same config),
finds its rank from the environment (see workers/dist/env.py), resumes from the newest intact
checkpoint in ``RUN_DIR/checkpoints`` if there is one, and trains.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from workers import config
from workers.dist import build_comm
from workers.dist.env import DistEnv
from workers.trainer import Trainer


def _peer_failed(e: BaseException) -> bool:
    """A collective broke because another rank died (gloo: the connection closed; NCCL: DistBackendError)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, dist.DistBackendError) or "closed by peer" in text or "reset by peer" in text


@record  # under torchrun, a crash's traceback lands in the failure report
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--comm", default="auto", choices=("auto", "ddp", "horovod"))
    args = parser.parse_args(argv)
    cfg = config.load(args.run_dir / "config.yaml")
    comm = build_comm(args.comm, DistEnv.from_env(os.environ), cfg.ddp)
    Trainer(cfg, comm, args.run_dir).train()  # mode=online: the same loop over a stream (workers/online.py)
    # only after a clean run: closing meets the other ranks at a barrier, which after a failure here would
    # wait out the collective timeout for peers that are in another collective, or gone
    comm.close()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:  # argparse, or a build failure already reported once (trainer.build_once)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # @record has written torchrun's error file; the console gets the traceback
        traceback.print_exc()
        code = 1
        if _peer_failed(e):  # a consequence, not the cause: let the runner see the rank that failed first
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the runner's stop ends this wait
            time.sleep(3)
    # Everything is saved, flushed and closed by now (or the run failed). Skip the interpreter's teardown:
    # C++ destructors of torch.distributed (gloo's threads) can abort a finished rank there ("terminate
    # called without an active exception"), which would turn a successful job into a failed one.
    if "mpi4py.MPI" in sys.modules:  # under mpirun: finalize, or mpirun reports an improper exit
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
