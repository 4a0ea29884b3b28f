"""The bare horovodrun baseline: minimal_ddp.py's loop with Horovod's DistributedOptimizer.

    horovodrun -np 2 -H localhost:2 --gloo python bench/minimal_horovod.py STEPS INTERVAL BATCH

As the launcher's horovod backend does: gradients averaged by hvd.DistributedOptimizer, the
parameters broadcast from rank 0 before the first step. Prints minimal_ddp.py's JSON line.
"""

import os

import horovod.torch as hvd
import torch
from minimal_ddp import mlp, train  # this script's folder is first on sys.path

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hvd.init()
    model = mlp()
    opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=3e-3),
                                   named_parameters=model.named_parameters(), op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    train(model, opt, hvd.rank(), hvd.size())
    hvd.barrier()  # leave together, as the launcher's HorovodComm.close does
    hvd.shutdown()
