"""Shared pieces of the benchmark suites: repeated measurement, launching, results as JSON + PNG."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from launcher.supervise.procs import stat_fields
from workers import contract

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass
class Stat:
    median: float
    lo: float
    hi: float
    runs: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        return cls(statistics.median(values), min(values), max(values), values)

    def as_dict(self) -> dict[str, object]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "runs": self.runs}


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, Stat]:
    """Run every measurement once per round, ``repeats`` rounds: side by side, so load drift hits all."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(repeats):
        for name, measure in measures.items():
            values[name].append(measure())
    return {name: Stat.of(v) for name, v in values.items()}


def launch(run_dir: Path, *args: str, timeout: float = 900) -> float:
    """Run the launcher; returns the wall-clock start time (for time-to-first-step)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "launcher", "--run-dir", str(run_dir), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"launcher failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return start


# backend -> what one types by hand to start its bare baseline on 2 local ranks (the script follows)
BARE = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "bench/minimal_ddp.py"],
    "mpi": ["mpirun", "-np", "2", "-H", "localhost:2", *(["--allow-run-as-root"] if os.geteuid() == 0 else []),
            sys.executable, "bench/minimal_ddp.py"],
    "horovod": ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "bench/minimal_horovod.py"],
}


def bare_run(backend: str, steps: int, interval: int, batch: int = 64) -> dict[str, float]:
    """Run a bare baseline (bench/minimal_*.py under its runner alone): rank 0's JSON line."""
    out = subprocess.run([*BARE[backend], str(steps), str(interval), str(batch)], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    # horovodrun prefixes each line with "[0]<stdout>:"
    lines = [ln[ln.index("{"):] for ln in out.stdout.splitlines() if '{"samples_per_s"' in ln]
    if not lines:  # the measurement is printed before teardown; only its absence is a failure
        raise RuntimeError(f"bare {backend} printed no result ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def rank_pids(run_dir: Path) -> dict[int, int]:
    """{local rank: pid} of the built-in trainer's live rank processes of the run in ``run_dir`` (benchmarks
    and tests kill one)."""
    found = []  # (local rank, pid, parent pid)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if contract.TRAINER_MODULE.encode() not in cmdline or str(run_dir).encode() not in cmdline:
                continue
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if not (fields := stat_fields(int(proc.name))):
            continue
        ppid = int(fields[1])
        # torchrun sets LOCAL_RANK before exec; under mpirun/horovodrun only their own variables are in
        # the initial environment
        local = next((env[k] for k in (b"LOCAL_RANK", b"OMPI_COMM_WORLD_LOCAL_RANK", b"HOROVOD_LOCAL_RANK")
                      if k in env), None)
        if local is not None:
            found.append((int(local), int(proc.name), ppid))
    ranks = {pid for _, pid, _ in found}
    # a rank's DataLoader workers share its command line and environment: keep those whose parent is no rank
    return {local: pid for local, pid, ppid in found if ppid not in ranks}


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, value, wall_time) of one TensorBoard tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value, e.wall_time) for e in acc.Scalars(tag)]


def steady_rate(run_dir: Path) -> float:
    """Median samples/s the trainer logged, leaving out the first interval (start-up, warm-up)."""
    rates = [v for _, v, _ in scalars(run_dir, "perf/samples_per_s")][1:]
    return statistics.median(rates)


def save(suite: str, payload: dict[str, object], plot: Callable[[Path], None], results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{suite}.json"
    stamp = {"suite": suite, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine()}
    out.write_text(json.dumps({**stamp, **payload}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    plot(results / f"{suite}.png")
    return out


def machine() -> str:
    """Where a result was measured, in a few words (the check's table shows it)."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.node()}: {os.cpu_count()} cores, {device}, torch {torch.__version__.split('+')[0]}"


def bar_plot(path: Path, title: str, stats: dict[str, Stat], ylabel: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(stats)
    meds = [stats[n].median for n in names]
    errs = [[stats[n].median - stats[n].lo for n in names], [stats[n].hi - stats[n].median for n in names]]
    ax.bar(names, meds, yerr=errs, capsize=4, color="#4c72b0")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pair_plot(path: Path, title: str, pairs: dict[str, tuple[Stat, Stat]], labels: tuple[str, str],
              ylabel: str, notes: dict[str, str] | None = None) -> None:
    """Two bars per group (e.g. a backend through the launcher and its bare runner), min-max as error bars,
    and a note above each group (e.g. the ratio)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.38
    for side, (label, color) in enumerate(zip(labels, ("#4c72b0", "#a0a0a0"), strict=True)):
        stats = [pair[side] for pair in pairs.values()]
        xs = [i + (side - 0.5) * width for i in range(len(pairs))]
        errs = [[s.median - s.lo for s in stats], [s.hi - s.median for s in stats]]
        ax.bar(xs, [s.median for s in stats], width, yerr=errs, capsize=4, color=color, label=label)
    top = max(s.hi for pair in pairs.values() for s in pair)
    for i, name in enumerate(pairs):
        if notes and name in notes:
            ax.text(i, top * 1.04, notes[name], ha="center", va="bottom")
    ax.set_ylim(0, top * 1.3)  # room for the notes and the legend
    ax.set_xticks(range(len(pairs)), list(pairs))
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper right", ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(rows: list[tuple[object, ...]], header: tuple[str, ...]) -> str:
    cells = [tuple(f"{c:.4g}" if isinstance(c, float) else str(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells)
