"""What ``python -m bench overhead`` reports besides the ratios: where the launcher's start-up goes, when a run's
first step ended, and a profile of the trainer's steps (where the per-step overhead goes)."""

from __future__ import annotations

import json
import os
import pstats
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT, Stat, table

PHASES = ("parse", "compose", "plan", "spawn", "ranks")  # the launcher's own start-up, then torchrun's and the ranks'


def first_step_at(run_dir: Path) -> float:
    """Wall-clock time rank 0 finished its first step (its progress file, workers/progress.py): the moment the
    bare loop's ``first_step_time`` marks too (after its first optimizer step)."""
    record = json.loads((run_dir / "attempts" / "0" / "rank0.progress").read_text())
    if not record["first_step_at"]:
        raise RuntimeError(f"{run_dir}: rank 0 reports no finished first step")
    return float(record["first_step_at"])


def startup_split(run_dir: Path, start: float) -> dict[str, float]:
    """Seconds per phase from ``start`` (when the launcher was started) to the end of the first step: ``parse``
    (interpreter, imports, arguments), ``compose`` (Hydra, target checks), ``plan`` (plan, resume check,
    pre-flight), ``spawn`` (run directory written; the runner starts right after: launcher/cli.py
    record_startup), ``ranks`` (torchrun and the ranks starting, the first step)."""
    marks = json.loads((run_dir / "startup.json").read_text())
    times = [start, marks["parsed"], marks.get("composed", marks["parsed"]), marks["planned"], marks["spawned"],
             first_step_at(run_dir)]
    return {phase: b - a for phase, a, b in zip(PHASES, times, times[1:], strict=False)}


def hooked_run(run_dir: Path, args: list[str], hook: str, name: str) -> Path:
    """One more launcher run, untimed, with a bench probe (bench/rank_hooks.py) that writes ``run_dir/name``."""
    out = run_dir / name
    env = {**os.environ, "LAUNCHER_HOOKS": "bench.rank_hooks", hook: str(out)}
    proc = subprocess.run([sys.executable, "-m", "launcher", "--run-dir", str(run_dir / "run"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"the run with {hook} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def profile_run(run_dir: Path, args: list[str]) -> Path:
    """One more launcher run with rank 0's training loop under cProfile."""
    return hooked_run(run_dir, args, "LAUNCHER_PROFILE", "rank0.prof")


def interleaved_run(run_dir: Path, args: list[str], log_every: int) -> dict[str, float]:
    """The trainer loop's own cost per step, measured where it can be resolved: one more launcher run (``args``: one
    rank) in which a step of the bare minimal loop, on the same model, precedes each of the trainer's steps
    (bench/rank_hooks.py ``interleave``), every step of both timed, so both loops meet the same machine at the
    same moments. With one rank there is no all-reduce, whose waits on this 2-core machine spread two-rank steps
    from 0.7x to 3x their median and leave a bias of tens of µs between the two slots of such a pair; the
    all-reduce is the same DDP code on both sides anyway. The trainer's log steps do more (the all-reduce,
    TensorBoard): their extra median time, spread over ``log_every`` steps, is added. The first ``log_every``
    steps (warm-up) are left out."""
    record = json.loads(hooked_run(run_dir, args, "LAUNCHER_BENCH_INTERLEAVE", "interleaved.json").read_text())
    marks = record["marks"]
    took = {n: marks[n] - marks[n - 1] for n in range(log_every + 1, len(marks))}  # the trainer's step n
    plain = statistics.median(t for n, t in took.items() if n % log_every)
    extra = statistics.median(t for n, t in took.items() if n % log_every == 0) - plain
    trainer, bare = plain + extra / log_every, statistics.median(record["bare"][log_every:])
    return {"trainer_step_us": trainer * 1e6, "bare_step_us": bare * 1e6, "step_overhead_us": (trainer - bare) * 1e6,
            "log_step_extra_us": extra * 1e6, "steps": len(took)}


def profile_rows(path: Path, steps: int, top: int = 15) -> list[dict[str, object]]:
    """The functions with the most own time in the profile, per training step (µs and calls)."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_, calls, own, total, _) in stats.items():
        where = name if file == "~" else f"{Path(file).name}:{line} {name}"
        rows.append({"function": where, "own_us_per_step": own / steps * 1e6, "total_us_per_step": total / steps * 1e6,
                     "calls_per_step": calls / steps})
    rows.sort(key=lambda r: -float(r["own_us_per_step"]))  # type: ignore[arg-type]
    return rows[:top]


def total_us_per_step(path: Path, steps: int) -> float:
    return pstats.Stats(str(path)).total_tt / steps * 1e6  # type: ignore[attr-defined]


def own_time_by_source(path: Path, steps: int) -> dict[str, float]:
    """µs per step of own time by where the code lives: each workers/ module, tqdm, tensorboard, torch, the rest.
    A builtin (a torch op, os.pwrite) counts where it is called from, so ``workers/progress.py`` holds its
    pwrites and ``workers/trainer.py`` the tensor ops it issues itself."""
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}

    def add(file: str, seconds: float) -> None:
        where = _source(file)
        out[where] = out.get(where, 0.0) + seconds / steps * 1e6

    for (file, _, _), (_, _, own, _, callers) in stats.items():
        if file != "~":
            add(file, own)
            continue
        for (caller_file, _, _), (_, _, caller_own, _) in callers.items():  # a builtin's time per caller
            add(caller_file, caller_own)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _source(file: str) -> str:
    path = Path(file)
    for package in ("workers", "launcher"):
        if (ROOT / package) in path.parents:
            return str(path.relative_to(ROOT))
    for name in ("tqdm", "tensorboard", "torch"):
        if f"/{name}/" in file:
            return name
    return "other (Python, builtins)"


def alternating(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Every measurement once per round, the order reversed every other round (ABBA): on a machine whose load
    drifts, the side measured first is not always the same one. Returns each measurement's values by round."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            values[name].append(measures[name]())
    return values


def profile(path: Path, steps: int) -> dict[str, Any]:
    """The profile's summary for the JSON: per step, in total, by source and by function."""
    return {"steps": steps, "us_per_step": total_us_per_step(path, steps), "top_own_time": profile_rows(path, steps),
            "own_us_per_step_by_source": own_time_by_source(path, steps)}


def startup_text(split: dict[str, Stat]) -> str:
    return ("launcher start-up to the end of the first step, by phase (median s; ranks: torchrun, the ranks, "
            "step 1):\n" + table([(p, split[p].median, split[p].lo, split[p].hi) for p in PHASES],
                                  ("phase", "s", "min", "max")))


def profile_text(summary: dict[str, Any]) -> str:
    text = (f"profile of rank 0's training loop (cProfile: {summary['steps']} steps, {summary['us_per_step']:.0f} us "
            "a step, the profiler's own cost included): own time by source (builtins where they are called):\n")
    text += table(list(summary["own_us_per_step_by_source"].items()), ("source", "own us/step"))
    text += "\nmost own time by function:\n"
    return text + table([(r["function"], r["own_us_per_step"], r["total_us_per_step"], r["calls_per_step"])
                         for r in summary["top_own_time"]], ("function", "own us/step", "total us/step", "calls/step"))
