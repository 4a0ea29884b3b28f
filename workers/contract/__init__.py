"""What the launcher and the ranks agree on: the environment the launcher sets for the ranks, the built-in
program's module, the phases a rank reports, and the run directory's files. Both sides import these names
(the ranks cannot import ``launcher/``; the launcher imports ``workers/``), so a name changes in one place.
Imports stay light (no torch): ``workers.rank`` and a Slurm array task read this before anything else.

The failure record (``failure.json``) is :class:`workers.contract.failure.Failure`.
"""

from __future__ import annotations

from pathlib import Path

# -- the environment the launcher sets for every rank (launcher/plan/planner.py, launcher/backends/) -----------------
RUN_DIR_ENV = "LAUNCHER_RUN_DIR"  # the run directory (a replica group's own, RUN_DIR/groups/G, under torchft)
ATTEMPT_ENV = "LAUNCHER_ATTEMPT"  # the launcher's restart count (mpirun, horovodrun: no TORCHELASTIC_RESTART_COUNT)
HOOKS_ENV = "LAUNCHER_HOOKS"  # modules each rank imports at its start (workers/hooks.py): tests' and benches' knobs
MAX_RESTARTS_ENV = "LAUNCHER_MAX_RESTARTS"  # Horovod Elastic: each slot's budget (workers/distributed/elastic.py)
HOST_ENV = "LAUNCHER_HOST"  # the host's name as the hostfile spells it (ssh fan-out)
DEVICES_ENV = "LAUNCHER_DEVICES"  # "host=0,2;other=1": a hostfile's gpus=, CUDA_VISIBLE_DEVICES per host
RESTART_BACKOFF_ENV = "LAUNCHER_RESTART_BACKOFF_S"  # seconds a restarted rank waits, doubled per restart
JOB_TOKEN_ENV = "LAUNCHER_JOB_TOKEN"  # every process of one run carries it: the launcher's reaper finds them by it

# -- runners' own names the ranks read -----------------------------------------------------------------------------
RESTART_COUNT_ENV = "TORCHELASTIC_RESTART_COUNT"  # torchrun's restart count
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # where torchrun's @record writes a rank's traceback
REPLICA_GROUP_ENV = "REPLICA_GROUP_ID"  # torchft's conventions, set by launcher/backends/torchft.py
NUM_REPLICA_GROUPS_ENV = "NUM_REPLICA_GROUPS"
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"

# -- programs ------------------------------------------------------------------------------------------------------
TRAINER_MODULE = "workers.train"  # the built-in program: ``python -m workers.train --run-dir RUN_DIR``
RANK_MODULE = "workers.rank"  # the wrapper a user's program runs under, reporting to the launcher like the trainer

# -- the phases a rank reports in its progress file (workers/progress.py), within one step in this order -----------
INIT, DATA, STEP, EVAL, CHECKPOINT, FAILED, DONE = PHASES = ("init", "data", "step", "eval", "checkpoint", "failed",
                                                             "done")


# -- the run directory ---------------------------------------------------------------------------------------------
def config_file(run_dir: Path) -> Path:
    """The resolved config the launcher writes and every rank trains."""
    return run_dir / "config.yaml"


def plan_file(run_dir: Path) -> Path:
    return run_dir / "plan.json"


def result_file(run_dir: Path) -> Path:
    """Rank 0's closing record: the last step and the eval metrics."""
    return run_dir / "result.json"


def failure_file(folder: Path) -> Path:
    """The failure record: ``RUN_DIR/failure.json`` (the newest failed attempt's) or an attempt folder's own."""
    return folder / "failure.json"


def events_file(run_dir: Path) -> Path:
    """Fault-tolerant runs' drops, resets and heals (workers/events.py)."""
    return run_dir / "events.jsonl"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def tensorboard_dir(run_dir: Path) -> Path:
    return run_dir / "tb"


def attempts_dir(run_dir: Path) -> Path:
    return run_dir / "attempts"


def attempt_dir(run_dir: Path, attempt: int) -> Path:
    """Each rank's records of one attempt (N: the restart count) and the launcher's failure record of it."""
    return attempts_dir(run_dir) / str(attempt)


def group_dir(run_dir: Path, group: int) -> Path:
    """Under torchft, replica group G's own run directory (its RUN_DIR_ENV): its attempts and records."""
    return run_dir / "groups" / str(group)


def run_dir_of_group(group_run_dir: Path) -> Path:
    """The job's run directory from a replica group's (:func:`group_dir`)."""
    return group_run_dir.parent.parent


def discovery_script(run_dir: Path) -> Path:
    """Horovod Elastic's host discovery script: it prints :func:`elastic_hosts_file`."""
    return run_dir / "discover_hosts.sh"


def elastic_hosts_file(run_dir: Path) -> Path:
    """Horovod Elastic's hosts, ``host:slots`` per line (launcher/backends/horovodrun.py writes it, the workers find
    their GPU by their line, workers/distributed/elastic.py)."""
    return run_dir / "elastic_hosts.txt"


def elastic_dropped_file(run_dir: Path) -> Path:
    """Horovod Elastic's slots past their --max-restarts, lines of :func:`elastic_hosts_file` that discovery leaves
    out (the hosts file itself never changes: a worker's GPU is its line's place in it)."""
    return run_dir / "elastic_dropped.txt"


# -- a rank's files in its attempt folder (workers/rank.py writes them, launcher/supervise/watch.py reads them) -----
PROGRESS, EXIT, STACKS, ERROR = ".progress", ".exit.json", ".stacks", ".error.json"


def rank_file(folder: Path, rank: int, kind: str) -> Path:
    """``folder/rank<R><kind>``, kind one of PROGRESS, EXIT, STACKS, ERROR."""
    return folder / f"rank{rank}{kind}"


def rank_files(folder: Path, kind: str) -> list[Path]:
    """Every rank's file of ``kind`` in an attempt folder."""
    return list(folder.glob(f"rank*{kind}"))


def rank_of(path: Path) -> int:
    """The rank a :func:`rank_file` belongs to."""
    return int(path.name[4:].split(".")[0])


def incarnation_dir(folder: Path, slot: int, incarnation: int) -> Path:
    """Under Horovod Elastic, the records of the ``incarnation``-th worker (0: the first) that Horovod started on
    ``slot`` in this attempt. Horovod starts a failed slot's worker again in the same attempt, and renumbers the
    ranks after each reset, so a worker's records are its own here; the attempt folder's ``rank<S>.*`` are links to
    the slot's newest worker's (workers/incarnation.py), which is what the launcher reads."""
    return folder / f"slot{slot}" / str(incarnation)


def hang_report(folder: Path) -> Path:
    """The launcher's table of every rank after a hang, in the attempt's folder."""
    return folder / "hang.txt"


def devices_by_host(value: str) -> dict[str, str]:
    """LAUNCHER_DEVICES's value, "host=0,2;other=1" -> {"host": "0,2", "other": "1"} (a hostfile's ``gpus=``)."""
    return dict(entry.partition("=")[::2] for entry in value.split(";") if entry)
