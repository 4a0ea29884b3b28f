"""Worker entry point: one rank of a data-parallel training job.

Started by the launcher (through torchrun, horovodrun or mpirun) as::

    python -m workers.train --run-dir RUN_DIR [--comm auto|ddp|horovod]

It reads ``RUN_DIR/config.yaml`` (written by the launcher, so every rank trains the same config),
finds its rank from the environment (see workers/distributed/env.py), resumes from the newest intact
checkpoint in ``RUN_DIR/checkpoints`` if there is one, and trains.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from workers import config, contract, rank
from workers.distributed import build_comm
from workers.distributed.env import DistEnv
from workers.trainer import Trainer


@record  # under torchrun, a crash's traceback lands in the failure report
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--comm", default="auto", choices=("auto", "ddp", "horovod", "torchft"))
    args = parser.parse_args(argv)
    cfg = config.load_resolved(contract.config_file(args.run_dir))  # composed and checked once, by the launcher
    comm = build_comm(args.comm, DistEnv.from_env(os.environ), cfg.ddp, os.environ,
                      cfg.trainer.elastic_commit_every)
    Trainer(cfg, comm, args.run_dir).train()  # mode=online: the same loop over a stream (workers/online.py)
    # only after a clean run: closing meets the other ranks at a barrier, which after a failure here would
    # wait out the collective timeout for peers that are in another collective, or gone
    comm.close()
    return 0


if __name__ == "__main__":
    # records how this rank ends (workers/rank.py): the launcher's failure report and hang watch read it
    rank.run(main, hard_exit=True)
