"""The ``elastic_commit`` suite: how often Horovod Elastic should commit (``trainer.elastic_commit_every``).

    python -m bench elastic_commit [--tiny]

One ``horovodrun -np 2 --gloo`` run of bench/commit_probe.py: the goodput suites' model and batch, a real
``hvd.elastic.TorchState``, round after round a block of plain steps and a block of steps each followed by a commit,
side by side. A commit's cost is the committed step's time less the plain step's (medians over the rounds): what
the loop loses, the commit's broadcast and its wait for the peer included (the commit timed alone, and its parts,
are reported beside it). From that cost and the plain step's time, the expected share of the time lost when
committing every K steps:

    overhead(K) = commit_s / (K * step_s)  +  failures_per_s * (K / 2) * step_s

the commits' time per step's time, plus the steps redone after each failure (the survivors roll back to the last
commit: K/2 steps on average, the last one partly done included). Its minimum is at K* = sqrt(2 commit_s /
failures_per_s) / step_s (Young's checkpoint interval, in steps). Two failure rates: the goodput suites' (a failure
every 20 s) and a production-like one (one an hour). The choice: the candidate K with the least overhead at the
goodput suites' rate. Near the optimum the curve is flat (K at twice or half the optimum costs 1.25x), so reruns
may pick a neighbour of the grid; the goal: ``trainer.elastic_commit_every`` in configs/trainer/default.yaml costs
at most 10 % more than the chosen K.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT, table

Result = tuple[dict[str, object], Callable[[Path], None], str]

CANDIDATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
RATES = {"every_20s": 1 / 20, "every_hour": 1 / 3600}  # failures per second
CHOOSE_BY = "every_20s"  # the goodput suites' schedule: a SIGKILL every 20 s
TOLERANCE = 1.1  # the goal: the config default's overhead is at most this times the chosen K's
RUNNER = ["horovodrun", "-np", "2", "-H", "localhost:2", "--gloo"]


def overhead(commit_s: float, step_s: float, failures_per_s: float, k: int) -> float:
    """Expected share of the training time lost to commits every ``k`` steps and to the steps redone after
    failures."""
    return commit_s / (k * step_s) + failures_per_s * (k / 2) * step_s


def choose_interval(commit_s: float, step_s: float, failures_per_s: float,
                    candidates: tuple[int, ...] = CANDIDATES) -> int:
    """The candidate K with the least expected overhead (the smaller on a tie): the candidate nearest Young's
    optimum on a log scale, since overhead(K) / overhead(K*) = (K / K* + K* / K) / 2."""
    return min(candidates, key=lambda k: (overhead(commit_s, step_s, failures_per_s, k), k))


def optimum(commit_s: float, step_s: float, failures_per_s: float) -> float:
    """The K that minimizes ``overhead`` over the reals: Young's interval sqrt(2 C / rate), in steps."""
    return math.sqrt(2 * commit_s / failures_per_s) / step_s


def config_default() -> int:
    """``trainer.elastic_commit_every`` in configs/trainer/default.yaml."""
    import yaml

    return int(yaml.safe_load((ROOT / "configs" / "trainer" / "default.yaml").read_text())["elastic_commit_every"])


def probe(rounds: int, steps: int) -> dict[str, Any]:
    """bench/commit_probe.py under horovodrun: rank 0's JSON line."""
    cmd = [*RUNNER, sys.executable, "-m", "bench.commit_probe", str(rounds), str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    # horovodrun prefixes each line with "[0]<stdout>:"
    lines = [ln[ln.index("{"):] for ln in out.stdout.splitlines() if '{"step_s"' in ln]
    if not lines:
        raise RuntimeError(f"bench.commit_probe printed no result ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def analyse(commit_s: float, step_s: float, default: int) -> dict[str, dict[str, Any]]:
    """Per failure rate: the overhead of each candidate, the chosen K (the least overhead), Young's optimum, and
    the config default's overhead against the chosen K's."""
    out: dict[str, dict[str, Any]] = {}
    for name, rate in RATES.items():
        costs = {str(k): overhead(commit_s, step_s, rate, k) for k in CANDIDATES}
        chosen = choose_interval(commit_s, step_s, rate)
        out[name] = {"failures_per_s": rate, "overhead": costs, "chosen": chosen,
                     "optimum": optimum(commit_s, step_s, rate),
                     "default_overhead": overhead(commit_s, step_s, rate, default),
                     "default_to_chosen": overhead(commit_s, step_s, rate, default) / costs[str(chosen)]}
    return out


def elastic_commit(repeats: int, tiny: bool) -> Result:
    from bench.data_suite import Neighbours

    rounds, steps = (1, 20) if tiny else (max(3, 3 * repeats), 200)

    busy, record = Neighbours(), {}  # the share of the CPU other processes took meanwhile: they slow the step

    def run() -> float:
        record.update(probe(rounds, steps))
        return 0.0

    busy.measure(run)()
    med = {k: statistics.median(record[k]) for k in ("step_s", "commit_s", "save_s", "check_s",
                                                     "commit_in_loop_s")}
    # the cost in the loop, not the call alone: a committed step less a plain one
    commit_s, step_s, default = med["commit_in_loop_s"], med["step_s"], config_default()
    rates = analyse(commit_s, step_s, default)
    chosen = rates[CHOOSE_BY]["chosen"]
    payload = {"probe": record, "medians_s": med, "commit_cost_s": commit_s, "step_s": step_s,
               "commit_to_step": commit_s / step_s,
               "state_mb": record["state_bytes"] / 1e6, "rates": rates, "chosen": chosen,
               "chosen_by": CHOOSE_BY, "config_default": default, "candidates": list(CANDIDATES),
               "neighbours_cpu_share": busy.shares[0] if busy.shares else None,
               "default_to_chosen": {name: r["default_to_chosen"] for name, r in rates.items()},
               "goals": {f"default_to_chosen.{CHOOSE_BY}": f"<= {TOLERANCE}"},
               "config": {"ranks": 2, "rounds": rounds, "steps_per_round": steps, "model.hidden": 1024,
                          "batch_per_rank": 64, "threads_per_rank": 1}}
    text = text_of(med, rates, chosen, default, record)
    if busy.shares:
        text += f"\nother processes took {busy.shares[0]:.0%} of the machine's CPU meanwhile"
    return payload, lambda p: plot(p, rates, chosen, default, med), text


def text_of(med: dict[str, float], rates: dict[str, dict[str, Any]], chosen: int, default: int,
            record: dict[str, Any]) -> str:
    ms = {k: v * 1e3 for k, v in med.items()}
    out = (f"plain step {ms['step_s']:.2f} ms; a committed step less a plain one (the commit's cost) "
           f"{ms['commit_in_loop_s']:.2f} ms\nthe commit call alone {ms['commit_s']:.2f} ms; on its own: save "
           f"{ms['save_s']:.2f} ms (copies of {record['state_bytes'] / 1e6:.2f} MB of weights and Adam state), "
           f"check_host_updates {ms['check_s']:.2f} ms (a broadcast)"
           f"\n(medians of {record['rounds']} rounds of {record['steps_per_round']} steps, 2 ranks)\n\n")
    rows = [(k, *(f"{r['overhead'][str(k)]:.2%}" for r in rates.values())) for k in CANDIDATES]
    out += table(rows, ("K", *(f"overhead, {name}" for name in rates)))
    for name, r in rates.items():
        out += (f"\n{name}: least overhead at K {r['chosen']} (optimum {r['optimum']:.0f}); the config's {default}: "
                f"{r['default_overhead']:.2%}, {r['default_to_chosen']:.2f}x that")
    return out + f"\nchosen (at {CHOOSE_BY}): trainer.elastic_commit_every={chosen}"


def plot(path: Path, rates: dict[str, dict[str, Any]], chosen: int, default: int, med: dict[str, float]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, r in rates.items():
        ax.loglog(CANDIDATES, [r["overhead"][str(k)] * 100 for k in CANDIDATES], "o-", label=name)
    ax.axvline(chosen, color="gray", ls="--", label=f"chosen K={chosen}")
    if default != chosen:
        ax.axvline(default, color="red", ls=":", label=f"config default {default}")
    ax.set_xlabel("commit every K steps")
    ax.set_ylabel("expected overhead, % of time")
    ax.set_title(f"elastic commit: {med['commit_in_loop_s'] * 1e3:.2f} ms a commit, "
                 f"{med['step_s'] * 1e3:.2f} ms a step (2 ranks)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
