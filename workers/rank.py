"""Each rank's report to the launcher, for any program: progress, how it ended, its stacks on demand.

    python -m workers.rank [--mpi] (-m MODULE | SCRIPT.py) [ARGS...]

runs the program in this process, as ``python`` would (``__main__``, ``sys.argv``, the script's
directory first on ``sys.path``), so a script written for torchrun runs unmodified; ``--mpi`` first
sets torchrun's variables from MPI (workers/distributed/mpi_env.py). The built-in trainer
(``python -m workers.train``) does the same through :func:`run` without this wrapper.

Files, in ``RUN_DIR/attempts/<N>/`` (N: torchrun's TORCHELASTIC_RESTART_COUNT, else the launcher's
LAUNCHER_ATTEMPT), all keyed by global rank (under Horovod Elastic by slot, in a folder per worker the attempt
folder's files link to: workers/incarnation.py):

``rank<R>.progress``    phase and step (workers/progress.py), read by the launcher's hang watch
``rank<R>.exit.json``   how the process ended: exit code or signal, when, host, pid, whether a peer's
                        failure caused it, the error file holding its traceback
``rank<R>.stacks``      every thread's Python stack, written by faulthandler on SIGUSR2 (the launcher
                        asks when the rank hangs) or on a fatal signal (SIGSEGV, SIGABRT, ...)
``rank<R>.error.json``  the traceback, in torchrun's error-file format — under torchrun, torchrun's own
                        TORCHELASTIC_ERROR_FILE is used instead (``@record`` writes it)

Only SIGKILL (the OOM killer, a ``kill -9``) ends a rank without an exit record; the launcher
tells such a death from the missing record. On a restart (N > 0) the rank first waits a backoff,
LAUNCHER_RESTART_BACKOFF_S doubled per restart (at most 30 s). Before anything else it imports the modules
LAUNCHER_HOOKS names (workers/hooks.py).
"""

from __future__ import annotations

import faulthandler
import json
import os
import runpy
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from workers import contract, files, hooks, incarnation, progress
from workers.distributed.env import DistEnv

MAX_BACKOFF_S = 30.0
PEER_WAIT_S = 3.0  # a rank whose peer died waits this long for the runner's stop (see finish)

_files: dict[str, Path] = {}  # exit, stacks, error: set up once per process
_stacks = None  # the open file faulthandler writes into (it must stay open)


def attempt_of(environ: os._Environ[str] | dict[str, str]) -> int:
    # torchrun's count after the launcher's: a replica group started again on a host that was lost (--fault-tolerant)
    return int(environ.get(contract.RESTART_COUNT_ENV) or 0) + int(environ.get(contract.ATTEMPT_ENV) or 0)


def current_attempt() -> int:
    """This process's attempt number (0 for the first start)."""
    return attempt_of(os.environ)


def setup() -> None:
    """Open this rank's files under the run directory; wait the restart backoff. Once per process."""
    global _stacks
    run_dir = os.environ.get(contract.RUN_DIR_ENV)
    if _files or not run_dir:
        return
    env, attempt = DistEnv.from_env(os.environ), attempt_of(os.environ)
    if hooks.rank_start:
        hooks.rank_start(attempt)
    folder = contract.attempt_dir(Path(run_dir), attempt)
    folder.mkdir(parents=True, exist_ok=True)
    # Horovod Elastic: a folder of this worker's own, named by its slot (workers/incarnation.py); else ``folder``
    own, number, head = incarnation.place(folder, env.rank, os.environ, Path(run_dir))
    error = contract.rank_file(own, number, contract.ERROR)
    _files.update(exit=contract.rank_file(own, number, contract.EXIT),
                  stacks=contract.rank_file(own, number, contract.STACKS),
                  error=Path(os.environ.setdefault(contract.ERROR_FILE_ENV, str(error))))
    _files["exit"].unlink(missing_ok=True)
    _stacks = open(_files["stacks"], "w")  # noqa: SIM115 -- faulthandler writes into it until the process ends
    faulthandler.enable(_stacks, all_threads=True)
    faulthandler.register(signal.SIGUSR2, _stacks, all_threads=True)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # the program may install its own handler later: that wins
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _record_and_die)
    pin_devices(os.environ)
    progress.start(contract.rank_file(own, number, contract.PROGRESS),
                   {"rank": number, "local_rank": env.local_rank, "world_size": env.world_size,
                    "pid": os.getpid(), "attempt": attempt,
                    "host": os.environ.get(contract.HOST_ENV) or socket.gethostname(),  # the hostfile's name
                    "hostname": socket.gethostname(), **head})
    incarnation.link(folder, own, number)
    if attempt > 0:
        backoff(Path(run_dir), attempt, env.rank)


def pin_devices(environ: os._Environ[str]) -> None:
    """A hostfile's ``gpus=``: LAUNCHER_DEVICES="host=0,2;other=1" -> CUDA_VISIBLE_DEVICES for this host's ranks,
    set before CUDA starts. This host is the one the launcher named (LAUNCHER_HOST, ssh fan-out), else the
    entry whose address this machine owns (mpirun and horovodrun start ranks without telling)."""
    for host, devices in contract.devices_by_host(environ.get(contract.DEVICES_ENV, "")).items():
        if environ.get(contract.HOST_ENV) == host or (contract.HOST_ENV not in environ and _is_this_host(host)):
            environ["CUDA_VISIBLE_DEVICES"] = devices
            return


def _is_this_host(name: str) -> bool:
    if name in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        with socket.socket() as s:  # an address is ours if we can bind to it
            s.bind((socket.gethostbyname(name), 0))
        return True
    except OSError:
        return False


def backoff(run_dir: Path, attempt: int, rank: int) -> None:
    """Wait LAUNCHER_RESTART_BACKOFF_S (see :func:`backoff_ends`), counted from the previous attempt's failure:
    the restart's own start-up (imports) is part of the wait, not added to it."""
    left = backoff_ends(run_dir, attempt, float(os.environ.get(contract.RESTART_BACKOFF_ENV) or 0),
                        time.time()) - time.time()
    if left > 0:
        if rank == 0:
            print(f"restart {attempt}: waiting {left:.1f} s more (backoff from the failure)", flush=True)
        time.sleep(left)


def backoff_ends(run_dir: Path, attempt: int, base: float, now: float) -> float:
    """When restart ``attempt``'s backoff ends: ``base`` after the previous attempt's failure, doubled for each
    restart before it, in a row, that failed before its first step (a crash loop; one that trained had started
    well, however it ended), at most MAX_BACKOFF_S. The failure's time: the previous attempt's first exit record,
    else its ranks' last progress (a SIGKILL leaves no exit record), else ``now``."""
    if not base:
        return now
    crashes = 0
    while crashes < attempt - 1 and not any(
            r.get("first_step_at") for r in _records(contract.attempt_dir(run_dir, attempt - 1 - crashes),
                                                     contract.PROGRESS)):
        crashes += 1
    previous = contract.attempt_dir(run_dir, attempt - 1)
    exits = [r.get("at", now) for r in _records(previous, contract.EXIT)]
    alive = [r.get("at", now) for r in _records(previous, contract.PROGRESS)]
    failed_at = min(exits) if exits else max(alive, default=now)
    return failed_at + min(base * 2 ** crashes, MAX_BACKOFF_S)


def _records(folder: Path, kind: str) -> list[dict]:
    """The attempt folder's rank files of ``kind``, read (Horovod Elastic: a link may dangle)."""
    return [r for p in contract.rank_files(folder, kind) if (r := files.read_json(p))]


def _record_and_die(signum: int, _frame: object) -> None:
    """A stop signal the program does not handle: record it, then die of it as the default action would."""
    finish(128 + signum, signal_name=signal.Signals(signum).name)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _stop_asked() -> bool:
    """The runner already said stop (the trainer's handler took the SIGTERM): no point waiting for it."""
    signals = sys.modules.get("workers.signals")
    return bool(signals is not None and signals.STOP_RECEIVED)


def _peer_failed(e: BaseException) -> bool:
    """A collective broke because another rank died (gloo: the connection closed; NCCL: DistBackendError)."""
    dist = sys.modules.get("torch.distributed")
    text = str(e)
    return (dist is not None and isinstance(e, dist.DistBackendError)) or "closed by peer" in text \
        or "reset by peer" in text


def record_error(e: BaseException) -> None:
    """The traceback in torchrun's error-file format, unless ``@record`` already wrote it."""
    path = _files.get("error")
    if path is None or path.exists():
        return
    data = {"message": {"message": f"{type(e).__name__}: {e}",
                        "extraInfo": {"py_callstack": "".join(traceback.format_exception(e)),
                                      "timestamp": str(int(time.time()))}}}
    path.write_text(json.dumps(data))


def finish(code: int, error: BaseException | None = None, *, peer_failed: bool = False,
           signal_name: str | None = None) -> None:
    """Write this rank's exit record (once)."""
    path = _files.get("exit")
    if path is None or path.exists():
        return
    if error is not None:
        record_error(error)
    record = {"exit_code": code, "signal": signal_name, "at": round(time.time(), 3), "peer_failed": peer_failed,
              "trained": progress.trained(),
              "error_file": str(_files["error"]) if _files["error"].exists() else None,
              "log": _log_file()}
    files.write_json(path, record, indent=None)
    progress.phase(contract.DONE if code == 0 else contract.FAILED)


def _log_file() -> str | None:
    """The file this rank's stderr goes to, where the runner redirects it (torchrun --log-dir)."""
    try:
        target = os.readlink("/proc/self/fd/2")
    except OSError:
        return None
    return target if target.startswith("/") and Path(target).is_file() else None


def run(main: Callable[[], int | None], *, hard_exit: bool) -> NoReturn:
    """Run ``main`` as this rank's program and exit with its code, recording how it ended.

    ``hard_exit``: leave with ``os._exit`` — the built-in trainer has saved, flushed and closed
    everything, and C++ destructors of torch.distributed (gloo's threads) can abort a finished rank in the
    interpreter's teardown ("terminate called without an active exception"), turning success into failure.
    A user's program exits normally (its atexit handlers run)."""
    try:
        hooks.load(os.environ)  # LAUNCHER_HOOKS: before setup(), whose start is a hook point
    except ImportError as e:  # reported as this rank's failure before its first step: the launcher does not retry
        print(e, file=sys.stderr, flush=True)
        setup()
        finish(1, e)
        raise SystemExit(1) from e
    setup()
    peer = False
    try:
        code = main() or 0
        error = None
    except SystemExit as e:  # argparse, sys.exit(N), or a build failure already reported once
        code, error = (e.code if isinstance(e.code, int) else (0 if e.code is None else 1)), None
    except BaseException as e:  # noqa: BLE001 -- any failure is recorded, then the process exits
        traceback.print_exc()
        code, error, peer = 1, e, _peer_failed(e)
    finish(code, error, peer_failed=peer)
    if peer and not _stop_asked():  # a consequence, not the cause: let the runner see the rank that failed first
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the runner's stop ends this wait
        time.sleep(PEER_WAIT_S)
    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:  # under mpirun: finalize, or mpirun reports an improper exit
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            if code != 0:  # a rank that finalized and failed leaves the others running until they end on their own
                MPI.COMM_WORLD.Abort(code)  # mpirun stops every rank now and exits with this code
            MPI.Finalize()
    if hard_exit:
        os._exit(code)
    sys.exit(code)


def _run_program(argv: list[str]) -> None:
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))  # as `python script.py` does
        runpy.run_path(argv[0], run_name="__main__")


def main(argv: list[str]) -> NoReturn:
    if argv[:1] == ["--mpi"]:
        from workers.distributed.mpi_env import torchrun_env

        os.environ.update(torchrun_env())
        argv = argv[1:]
    elif argv[:1] == ["--horovod"]:  # horovodrun's HOROVOD_* (or OMPI_*) -> torchrun's names
        from workers.distributed.env import torchrun_env as from_runner

        os.environ.update(from_runner(os.environ))
        argv = argv[1:]
    if not argv or argv == ["-m"]:
        sys.exit("usage: python -m workers.rank [--mpi|--horovod] (-m MODULE | SCRIPT.py) [ARGS...]")
    run(lambda: _run_program(argv), hard_exit=argv[:2] == ["-m", contract.TRAINER_MODULE])


if __name__ == "__main__":
    import workers.rank  # the module, not this __main__ copy: the program imports it by that name

    workers.rank.main(sys.argv[1:])
