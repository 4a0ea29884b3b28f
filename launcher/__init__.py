"""Start data-parallel PyTorch training on one machine or many, through torchrun or horovodrun.

Usage::

    python -m launcher --gpus 2                                  # built-in trainer, default config
    python -m launcher --gpus 2 optimizer=sgd optimizer.lr=0.05 trainer.max_steps=300
    python -m launcher --gpus 2 model._target_=my_pkg.Net model.width=64 data._target_=my_pkg.make_data
    python -m launcher --nodes 2 --gpus 8 --node-rank 0 --master-addr 10.0.0.1   # run on each node
    python -m launcher --hostfile hosts.txt --gpus 8             # from one node: ssh to every host
    python -m launcher --hostfile hosts.txt --nodes 1:4          # elastic: go on without a node that dies
    python -m launcher --gpus 2 --fault-tolerant                 # torchft: survivors train on, the failed heals
    python -m launcher --slurm --nodes 2 --gpus 8 --partition gpu --time 04:00:00   # sbatch it
    python -m launcher --gpus 2 mode=online online.source=file online.path=s.jsonl   # learn from a stream
    python -m launcher --gpus 2 -m optimizer.lr=1e-3,3e-3 model.hidden=64,128 --name s   # a sweep: 4 runs
    python -m launcher --gpus 2 -- path/to/any_torchrun_script.py --its-args
    python -m launcher --backend horovod --gpus 2                # horovodrun, Horovod's optimizer
    python -m launcher --gpus 2 --dry-run                        # print the exact commands, start nothing
    python -m launcher preflight --hostfile hosts.txt --gpus 8   # check the hosts; --preflight: then launch

``--gpus`` is ranks per node. With CUDA each rank gets one GPU (its LOCAL_RANK) and talks NCCL;
without CUDA the ranks run on the CPU and talk gloo, and the launcher says so.

Config: Hydra groups in ``configs/`` (model, data, optimizer, schedule, trainer) hold every default;
overrides are ``KEY=VALUE`` words. The user's parts are ``_target_`` nodes: ``model`` (any nn.Module),
``data`` (a function returning (train, eval) datasets; ``data.num_workers`` etc. are the loader's),
``loss``, ``metrics``, ``optimizer`` (any torch.optim class); their other keys are the target's
arguments, and setting ``_target_`` on the command line drops the preset's keys. ``--config-dir DIR``
for your own groups. All of it is checked before anything starts: a bad key or value, a target that
does not import or take its keys, or a model whose constructor raises (built on the meta device)
exits with status 2 and one line naming it.

Run directory (``runs/<name or timestamp>/``, or ``--run-dir``): ``config.yaml`` (the resolved
config every rank trains), ``plan.json`` (these commands), ``logs/`` (per-rank stdout/stderr, per
attempt), ``checkpoints/`` (rank 0, atomic, newest K kept), ``tb/`` (TensorBoard), ``result.json``,
``attempts/<N>/`` (what each rank reported: progress, exit record, Python stacks after a hang) and
``failure.json`` (the newest failed attempt: the first rank to fail, its host, exit code or signal,
the tail of its traceback; also in ``attempts/<N>/``).

Sweeps (``-m``/``--multirun``): Hydra expands ``a=1,2 b=x,y`` (and range(), choice(), glob()) into
members, each a normal run in ``runs/<name or timestamp>/<index>-<key=value,…>/``, all checked before any
starts (a bad member: exit 2). They run one after another; a failed one is recorded and the sweep goes
on (exit: the first failed member's code). ``summary.csv`` in the sweep directory has a row per member
(status, exit code, swept keys, train/loss, eval metrics, wall time); TensorBoard's HPARAMS tab compares
them. The same command again skips finished members and resumes the rest. ``--slurm`` makes one job
array (``--max-parallel K``: ``--array=0-N%K``), a task per member, requeued on preemption like a single
job. ``hydra/sweeper=optuna`` (where installed) proposes members from earlier ``--objective`` values;
those run here only. ``--dry-run`` lists the members and their commands.

Hangs: every rank reports its phase and step; one that makes no progress for ``--hang-timeout``
(``--init-timeout`` before the first step, ``--checkpoint-timeout`` while saving) is named with
every rank's phase and last step, all ranks' Python stacks are saved, and the run stops — or
restarts, under ``--max-restarts``. Restarts wait ``--restart-backoff`` (doubled in a crash loop), and an
attempt that failed before its first training step is not restarted. A rank whose own share of the
step stays above 1.5x the median is named as a straggler (log and TensorBoard).
Training through failures (``--fault-tolerant``, torchrun backend, one node): torchft's lighthouse and one
torchrun per rank, each rank a replica group with its own ``--max-restarts`` (default 3). A rank that dies or
hangs is dropped from the per-step quorum within about a second; the other groups never stop, its group alone
restarts, heals from a live peer's state over the network and rejoins at the peers' step. Checkpoints and
TensorBoard come from rank 0 of the lowest-numbered live group; every restart, drop, rejoin, heal, failure
and hang is a console line and a record in ``RUN_DIR/events.jsonl``. Ranks get REPLICA_GROUP_ID,
NUM_REPLICA_GROUPS and TORCHFT_LIGHTHOUSE (torchft's own conventions), so a torchft program runs unmodified.
With ``--backend horovod`` it is Horovod Elastic: horovodrun with ``--min-np 1 --max-np N`` and the launcher's
host discovery script (each rank a host of its own on one node); the survivors roll back to the last in-memory
commit (``trainer.elastic_commit_every``), go on at the smaller size, and a restarted worker is added back.
Launching again into the same run directory resumes from its newest intact checkpoint;
``--no-resume`` starts at step 0 and moves the old checkpoints aside.

Environment each rank gets (torchrun's contract, so any torchrun script runs unmodified):
RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT, plus
PYTHONUNBUFFERED=1, OMP_NUM_THREADS (cores / ranks unless set) and LAUNCHER_RUN_DIR.
Every process of the run (runners, ranks, ssh clients, node agents) carries LAUNCHER_JOB_TOKEN, a fresh
uuid, or the value already set in the launcher's environment (to find the run's processes by it): if
the launcher dies, even by SIGKILL, a watchdog stops the processes carrying it within seconds.

Pre-flight (``python -m launcher preflight [--hosts …|--hostfile F]``, or ``--preflight`` before a launch):
every host runs ``python -m launcher.preflight.probe`` over ssh at once (Python/torch/NCCL or gloo versions, GPUs,
nvidia-smi ECC errors and kernel-log XIDs, the rendezvous port on the first host, a local all-reduce), then the
first host all-reduces with each other one (gloo over TCP). A table; a host that is unreachable, differs in
versions, lacks GPUs, has ECC errors or a hardware XID, holds the port, or is slow (at most half the median of
the other hosts' local all-reduce, or of the other links; a lone link: a tenth of the first host's loopback)
is named with its fix, and the exit status is 2 (``--preflight``: nothing starts; RUN_DIR/preflight.json).

Exit status: 0 on success; 2 for bad input (nothing was started); the exit code of the first rank
to fail, on every backend (128+N for a signal: 137 for SIGKILL; the launcher prints which rank
failed and the tail of its traceback); 124 after a hang; 130/143 after SIGINT/SIGTERM.
"""
