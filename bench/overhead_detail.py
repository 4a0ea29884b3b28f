"""What ``python -m bench overhead`` reports besides the ratios: where the launcher's start-up goes, when a run's
first step ended, and a profile of the trainer's steps (where the per-step overhead goes)."""

from __future__ import annotations

import json
import os
import pstats
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT

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


def profile_run(run_dir: Path, args: list[str]) -> Path:
    """One more launcher run, untimed, with rank 0's training loop under cProfile (workers/testhooks.py)."""
    out = run_dir / "rank0.prof"
    proc = subprocess.run([sys.executable, "-m", "launcher", "--run-dir", str(run_dir / "run"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "LAUNCHER_PROFILE": str(out)})
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"profiled run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


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
