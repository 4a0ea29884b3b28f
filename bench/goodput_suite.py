"""The ``goodput`` suite: training through failures, restart-all against ``--fault-tolerant`` (torchft).

    python -m bench goodput [--tiny]        # a wider MLP than the default: a step of ~4 ms
    python -m bench goodput_lm [--tiny]     # the lm suite's decoder: a step of ~50 ms

Real ``python -m launcher`` runs of the built-in trainer, 2 CPU ranks (2 replica groups of 1 rank under
``--fault-tolerant``). torchft's cost is a fixed ~2 ms a step here (a quorum and a commit round), most of a 4 ms
step and a few per cent of a 50 ms one, hence the two models. Side by side, each for the same wall-clock window
from the launcher's start:

1. ``plain``: the torchrun backend, no failure: the baseline of samples trained in the window;
2. ``ft_no_failures``: ``--fault-tolerant``, no failure: torchft's cost per step;
3. ``restart_all``: ``--max-restarts 20``, a failure every INTERVAL seconds (a seeded random rank; SIGKILL, the
   middle one SIGSTOP with ``--hang-timeout 3``): every failure restarts every rank from the last checkpoint;
4. ``fault_tolerant``: ``--fault-tolerant --max-restarts 20``, the same schedule: the other group goes on, the
   failed group heals;
5. ``lm_cost_per_step`` (``goodput`` only): torchft's cost per step without failures on the lm suite's CPU
   decoder (a step of ~50 ms), plain and ``--fault-tolerant`` interleaved (goal: at most 5 % where a step takes
   50 ms or more).

At the end of the window the launcher gets SIGTERM; its last checkpoint's step is the progress made. Samples
trained: step x groups x batch, less (fault tolerant) the samples of the steps a group missed
(``torchft.group_steps_missed`` in the checkpoint). Goodput: samples trained / ``plain``'s. Also: the healthy
groups' stall per failure (events.jsonl's ``drop`` records), time to heal (a group's restart to its heal),
steps trained twice (restart-all: each failure's step less the step it resumed from; fault tolerant: the
healthy groups never restart, counted from events.jsonl).
"""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT, Stat, bar_plot, rank_pids, scalars, table
from bench.elastic_commit_suite import config_default as commit_every
from workers import contract
from workers.contract import failure as failure_record
from workers.events import read as events

Result = tuple[dict[str, object], Callable[[Path], None], str]

MODEL = ["model.hidden=1024", "data.batch_size=64", "trainer.max_steps=100000000", "trainer.log_every=10",
         "trainer.checkpoint_every=100", "trainer.eval_every=100000000", "trainer.threads=1"]
GOALS = {"goodput.fault_tolerant": ">= 0.9", "healthy_stall_s.max": "<= 1", "steps_redone.fault_tolerant": "<= 0",
         "lm_cost_per_step.ratio": "<= 1.05"}


def group_pids(run_dir: Path) -> dict[int, int]:
    """{replica group: pid} of a ``--fault-tolerant`` run's live rank processes (the trainers, not torchrun)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if contract.TRAINER_MODULE.encode() in argv and b"torch.distributed.run" not in argv \
                and str(run_dir).encode() in argv and state != "Z":
            group = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"REPLICA_GROUP_ID=")), None)
            if group is not None:
                found[int(group)] = int(proc.name)
    return found


def elastic_workers(run_dir: Path) -> dict[int, int]:
    """{pid: Horovod rank at the worker's start} of a Horovod Elastic run's live workers (the built-in trainer or a
    user's script; not horovodrun's task wrapper). A worker started again may take the start rank of one still
    running."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if env.get(b"LAUNCHER_RUN_DIR") == str(run_dir).encode() and b"HOROVOD_HOSTNAME" in env and state != "Z" \
                and b"HOROVOD_RANK" in env:
            found[int(proc.name)] = int(env[b"HOROVOD_RANK"])
    return found


def elastic_pids(run_dir: Path) -> dict[int, int]:
    """{start rank: pid}: whom a failure in the schedule kills."""
    return {rank: pid for pid, rank in elastic_workers(run_dir).items()}


def run_windows(runs: dict[str, tuple[list[str], list[tuple[float, int, int]], Callable[[Path], dict[int, int]]]],
                window: float, model: list[str] = MODEL, batch: int = 64) -> dict[str, dict]:
    """Each run of ``runs`` (name: (launcher flags, failure schedule, pid finder)) for ``window`` seconds, one after
    the other, each with its events.jsonl records. ``model``: the trainer's overrides, ``batch`` per rank."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, (extra, failures, find) in runs.items():
            print(f"goodput: {name} ({window:g} s)", flush=True)
            run_dir = Path(d) / name
            results[name] = run_window(run_dir, extra, window, failures, find, model, batch)
            results[name]["events"] = events(run_dir)
    return results


def run_window(run_dir: Path, extra: list[str], window_s: float, failures: list[tuple[float, int, int]],
               find: Callable[[Path], dict[int, int]], model: list[str], batch: int) -> dict[str, object]:
    """One launcher run for ``window_s`` seconds; ``failures``: (seconds after the start, rank, signal), the pid
    of the rank from ``find``."""
    start = time.monotonic()
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # noqa: SIM115 -- the launcher writes it until the end
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "--gpus", "2", "--run-dir", str(run_dir), *extra,
                             *model], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    done = []
    for at, rank, sig in failures:
        while time.monotonic() - start < at:
            time.sleep(0.05)
        pid = find(run_dir).get(rank)
        if pid is not None:
            os.kill(pid, sig)
            done.append({"at_s": round(time.monotonic() - start, 2), "rank": rank, "signal": signal.Signals(sig).name,
                         "time": round(time.time(), 3)})
    while time.monotonic() - start < window_s:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # stop: the ranks checkpoint where they are and exit
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    import torch

    steps = sorted((run_dir / "checkpoints").glob("step-*.pt"))
    state = torch.load(steps[-1], weights_only=True) if steps else {}
    step = int(state.get("train_state", {}).get("step", 0))
    missed = int(state.get("torchft", {}).get("group_steps_missed", 0))
    rates = [v for _, v, _ in scalars(run_dir, "perf/samples_per_s")][1:] if (run_dir / "tb").exists() else []
    failure_steps = []  # restart-all: the step each attempt failed at (the launcher's failure records)
    attempts = contract.attempts_dir(run_dir).glob("*")
    for folder in sorted(attempts, key=lambda f: int(f.name) if f.name.isdigit() else -1):
        record = failure_record.read(contract.failure_file(folder))
        if record is not None and record.step is not None:
            failure_steps.append(int(record.step))
    return {"step": step, "group_steps_missed": missed, "failure_steps": failure_steps,
            "samples": (step * 2 - missed) * batch, "failures": done,
            "samples_per_s_median": statistics.median(rates) if rates else None,
            "output": (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")}


# the lm suite's CPU decoder (bench/suites.py), a step of ~50 ms on 2 CPU ranks here: torchft's fixed per-step
# cost against a step of the size the goal is about (>= 50 ms)
LM_MODEL = ["model=gpt", "data=synthetic_tokens", "model.layers=2", "model.heads=4", "model.width=128",
            "data.context=128", "data.vocab_size=512", "data.batch_size=8", "trainer.threads=1"]
LM = [*LM_MODEL, "trainer.max_steps=120", "trainer.log_every=20", "trainer.eval_every=1000000",
      "trainer.checkpoint_every=1000000"]
# goodput_lm's: a checkpoint every 20 steps (~1 s; the MLP's every 100 are ~0.4 s)
LM_WINDOW = [*LM_MODEL, "trainer.max_steps=100000000", "trainer.log_every=10", "trainer.checkpoint_every=20",
             "trainer.eval_every=100000000"]


def cost_per_step(repeats: int) -> dict[str, object]:
    """--fault-tolerant against plain torchrun without failures, on the lm model, interleaved: seconds a step
    (rank 0's logged samples/s, the first window left out) and their ratio."""
    step_s: dict[str, list[float]] = {"plain": [], "fault_tolerant": []}
    for _ in range(repeats):
        for name, extra in (("plain", []), ("fault_tolerant", ["--fault-tolerant"])):
            with tempfile.TemporaryDirectory() as d:
                subprocess.run([sys.executable, "-m", "launcher", "--gpus", "2", "--run-dir", d, *extra, *LM],
                               cwd=ROOT, capture_output=True, timeout=600, check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
                rates = [v for _, v, _ in scalars(Path(d), "perf/samples_per_s")][1:]
                step_s[name].append(8 * 2 / statistics.median(rates))  # batch 8 on each of 2 ranks
    plain, ft = (statistics.median(step_s[k]) for k in ("plain", "fault_tolerant"))
    return {"step_s": step_s, "plain_step_s": plain, "ft_step_s": ft, "ratio": ft / plain,
            "overhead_ms": (ft - plain) * 1e3}


def stalls_by_signal(records: list[dict], failures: list[dict]) -> tuple[list[float], list[float]]:
    """The healthy groups' stall at each ``drop``, after a SIGKILL and after a SIGSTOP (the failure just before)."""
    by_signal: dict[str, list[float]] = {"SIGKILL": [], "SIGSTOP": []}
    for drop in (e for e in records if e["kind"] == "drop"):
        before = [f for f in failures if f["time"] <= drop["time"]]
        if before:
            by_signal.setdefault(before[-1]["signal"], []).append(drop["stall_s"])
    return by_signal["SIGKILL"], by_signal["SIGSTOP"]


def time_to_heal(records: list[dict]) -> list[float]:
    """Seconds from each group restart (its rank's first record) to that group's next heal."""
    out = []
    for r in (e for e in records if e["kind"] == "restart"):
        later = [h["time"] for h in records
                 if h["kind"] == "heal" and h["group"] == r["group"] and h["time"] > r["time"]]
        if later:
            out.append(round(min(later) - r["time"], 3))
    return out


def goodput(repeats: int, tiny: bool) -> Result:
    """The MLP, a step of ~4 ms, and torchft's cost per step on the lm model."""
    return goodput_of(MODEL, 64, tiny, cost=cost_per_step(1 if tiny else max(repeats, 3)))


def goodput_lm(repeats: int, tiny: bool) -> Result:
    """The lm suite's decoder, a step of ~50 ms: where torchft's fixed cost per step is small, as in real training."""
    return goodput_of(LM_WINDOW, 8, tiny)


def goodput_of(model: list[str], batch: int, tiny: bool, cost: dict[str, object] | None = None) -> Result:
    window, interval = (45.0, 12.0) if tiny else (150.0, 20.0)
    rng = random.Random(0)
    times = [interval * (i + 1) for i in range(int(window // interval) - 1)]
    schedule = [(t, rng.randrange(2), signal.SIGSTOP if i == len(times) // 2 else signal.SIGKILL)
                for i, t in enumerate(times)]
    runs = {"plain": ([], [], rank_pids), "ft_no_failures": (["--fault-tolerant"], [], group_pids),
            "restart_all": (["--max-restarts", "20", "--hang-timeout", "3"], schedule, rank_pids),
            # the same restart budget: each group's own is 3 by default, and one rank takes 4 of the failures
            "fault_tolerant": (["--fault-tolerant", "--max-restarts", "20", "--hang-timeout", "3"], schedule,
                               group_pids)}
    results = run_windows(runs, window, model, batch)
    base = results["plain"]["samples"] or 1
    ft_events = results["fault_tolerant"]["events"]
    stalls, stop_stalls = stalls_by_signal(ft_events, results["fault_tolerant"]["failures"])
    restarts = [e for e in ft_events if e["kind"] == "restart"]
    heal_s = time_to_heal(ft_events)
    # restart-all: every rank trains again the steps between the checkpoint it resumed from and the failure
    out = results["restart_all"]["output"]
    resumed = [int(m) for m in re.findall(r"\[rank0\]:resuming from step (\d+)", out)]
    failed = results["restart_all"]["failure_steps"]
    redone_all = sum(max(0, f - r) for f, r in zip(failed, resumed, strict=False))
    victims = {f["rank"] for f in results["fault_tolerant"]["failures"]}
    healthy_restarts = sum(1 for e in restarts if e["group"] not in victims)
    payload = {
        "window_s": window, "interval_s": interval, "model": model, "batch_per_rank": batch,
        "step_s": {k: 2 * batch / v["samples_per_s_median"] for k, v in results.items() if v["samples_per_s_median"]},
        "schedule": [{"at_s": t, "rank": r, "signal": signal.Signals(s).name} for t, r, s in schedule],
        "samples": {k: v["samples"] for k, v in results.items()},
        "goodput": {k: v["samples"] / base for k, v in results.items()},
        "ft_cost_per_step": (results["ft_no_failures"]["samples_per_s_median"] or 0)
        / (results["plain"]["samples_per_s_median"] or 1),
        "healthy_stall_s": Stat.of(stalls).as_dict() if stalls else None,  # after a SIGKILL: the goal's
        "healthy_stall_sigstop_s": stop_stalls,  # the group is dropped when its collective times out
        "time_to_heal_s": Stat.of(heal_s).as_dict() if heal_s else None,
        "steps_redone": {"restart_all": redone_all, "fault_tolerant": healthy_restarts},
        "restart_all_failed_at": failed, "restart_all_resumed_from": resumed,
        "failures": {k: v["failures"] for k, v in results.items()},
        "events": ft_events,
        **({"lm_cost_per_step": cost} if cost else {}),
        "goals": GOALS if cost else {k: v for k, v in GOALS.items() if not k.startswith("lm_")},
    }
    rows = [(k, v["step"], v["samples"], v["samples"] / base) for k, v in results.items()]
    text = table(rows, ("run", "last step", "samples", "goodput"))
    text += (f"\nhealthy stall per SIGKILL (fault tolerant): {stalls}, per SIGSTOP: {stop_stalls}; "
             f"time to heal: {[round(x, 2) for x in heal_s]}"
             f"\nsteps redone: restart-all {redone_all}, fault tolerant (healthy group restarts) {healthy_restarts}"
             f"\ntorchft cost per step, no failures: {payload['ft_cost_per_step']:.3f} of plain torchrun's samples/s"
             + (f"\nlm model: {cost}" if cost else ""))
    stats = {k: Stat.of([v["samples"] / base]) for k, v in results.items()}
    return payload, lambda p: bar_plot(p, f"goodput over {window:g} s, a failure every {interval:g} s", stats,
                                       "samples / plain's"), text


HOROVOD_GOALS = {"goodput.elastic": ">= 0.85", "survivor_stall_s.max": "<= 2"}  # + steps redone <= the commit interval


def samples_elastic(records: list[dict], last_step: int, batch: int = 64, size: int = 2) -> int:
    """Samples in the history that led to ``last_step``: each reset record starts a stretch at its size from its
    step (the steps redone after a rollback count once, in the stretch that trained them last)."""
    marks = sorted(((e["step"], e["size"]) for e in records if e["kind"] == "reset"), key=lambda m: m[0])
    total, at = 0, 0
    for step, new_size in marks:
        total += max(0, min(step, last_step) - at) * size
        at, size = min(step, last_step), new_size
    return (total + max(0, last_step - at) * size) * batch


def goodput_horovod(repeats: int, tiny: bool) -> Result:
    """The horovod rows: restart-all under horovodrun against Horovod Elastic (--backend horovod --fault-tolerant),
    the torchrun rows' window and failure times; every failure a SIGKILL (Horovod Elastic has no hang watch: a
    stopped worker would hold the survivor for gloo's 30 s timeout)."""
    window, interval = (45.0, 12.0) if tiny else (150.0, 20.0)
    rng = random.Random(0)
    times = [interval * (i + 1) for i in range(int(window // interval) - 1)]
    schedule = [(t, rng.randrange(2), signal.SIGKILL) for t in times]
    hvd = ["--backend", "horovod"]
    runs = {"horovod_plain": (hvd, [], rank_pids),
            "horovod_restart_all": ([*hvd, "--max-restarts", "20"], schedule, rank_pids),
            "horovod_elastic": ([*hvd, "--fault-tolerant"], schedule, elastic_pids)}
    results = run_windows(runs, window)
    elastic = results["horovod_elastic"]
    elastic["samples"] = samples_elastic(elastic["events"], int(elastic["step"]))  # type: ignore[arg-type]
    base = results["horovod_plain"]["samples"] or 1
    resets = [e for e in elastic["events"] if e["kind"] == "reset"]
    # the survivors' stall: from their last step before a failure to their first after it (a shrink's "resumed")
    stalls = [e["stall_s"] for e in elastic["events"] if e["kind"] == "resumed" and e["size"] == 1]
    joins = [e["stall_s"] for e in elastic["events"] if e["kind"] == "resumed" and e["size"] == 2]
    out = results["horovod_restart_all"]["output"]
    resumed = [int(m) for m in re.findall(r"\[rank0\]:resuming from step (\d+)", out)]
    failed = results["horovod_restart_all"]["failure_steps"]
    payload = {
        "window_s": window, "interval_s": interval,
        "schedule": [{"at_s": t, "rank": r, "signal": signal.Signals(s).name} for t, r, s in schedule],
        "samples": {k: v["samples"] for k, v in results.items()},
        "goodput": {k.removeprefix("horovod_"): v["samples"] / base for k, v in results.items()},
        "survivor_stall_s": Stat.of(stalls).as_dict() if stalls else None,
        "rejoin_stall_s": Stat.of(joins).as_dict() if joins else None,
        "steps_redone": {"restart_all": sum(max(0, f - r) for f, r in zip(failed, resumed, strict=False)),
                         "elastic": sum(e["redo"] for e in resets if e["size"] == 1),
                         "elastic_max": max((e["redo"] for e in resets), default=0)},
        "failures": {k: v["failures"] for k, v in results.items()},
        "events": elastic["events"],
        "goals": {**HOROVOD_GOALS, "steps_redone.elastic_max": f"<= {commit_every()}"},
    }
    rows = [(k, v["step"], v["samples"], v["samples"] / base) for k, v in results.items()]
    text = table(rows, ("run", "last step", "samples", "goodput"))
    text += (f"\nsurvivor stall per failure (elastic): {stalls}; the survivor's stall when a worker rejoins: {joins}"
             f"\nsteps redone: {payload['steps_redone']}")
    stats = {k: Stat.of([v["samples"] / base]) for k, v in results.items()}
    return payload, lambda p: bar_plot(p, f"horovod goodput over {window:g} s, a SIGKILL every {interval:g} s",
                                       stats, "samples / horovod plain's"), text
