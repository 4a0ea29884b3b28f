"""``python -m bench check``: the latest results against their goals. Measures nothing.

    python -m bench check                  # a table, then what falls short; exit 0 either way
    python -m bench check --readme         # and rewrite README.md's table between the bench markers

Reads bench/results/*.json and bench/results/gpu/*.json. Each suite's JSON carries its goals,
``"goals": {"ratio_to_bare.horovod": ">= 0.97", ...}``: a key is a path into the JSON (keys joined by
dots; a ``{"median": ...}`` statistic stands for its median, a group of named values for its first),
a goal is ``"OP NUMBER"`` with OP one of >=, <=, >, <, or ``{"min": x}`` / ``{"max": x}``; a bare number
is a ceiling (seconds, as the recovery suite writes them). Results from before their suite wrote goals
get them from FALLBACK.
"""

from __future__ import annotations

import argparse
import json
import operator
import re
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS, ROOT, table

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}

# goals of results whose JSON does not carry them: written before "goals" existed, or (overhead) by a
# suite that keeps them as goal_* keys
FALLBACK: dict[str, dict[str, str]] = {
    "overhead": {"ratio_steps_per_s": ">= 0.99", "ratio_time_to_first_step": "<= 1.1"},
    "checkpoint": {"ratio_async_to_sync": "<= 0.1"},
    "data": {"ratios.workers_2_to_0_1rank": ">= 1.6", "ratios.fast_path_to_plain": ">= 1.0"},
}
GPU_MFU_GOAL = ">= 0.4"  # lm: only against a GPU's peak (the CPU "peak" is a matmul probe)


@dataclass
class Row:
    suite: str
    metric: str
    value: float | None
    goal: str
    verdict: str  # ok, short, missing (no such value in the JSON), unreadable goal
    when: str
    machine: str
    tiny: bool

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def status(self) -> str:
        return f"{self.verdict} (tiny run)" if self.tiny else self.verdict


def goals_of(suite: str, record: dict) -> dict[str, object]:
    if "goals" in record:
        return record["goals"]
    if suite == "lm" and not str(record.get("device", "cpu")).startswith("cpu"):
        return {f"mfu.{record['fastest']}": GPU_MFU_GOAL}
    return FALLBACK.get(suite, {})


def spec(goal: object) -> tuple[str, float] | None:
    """A goal as (operator, number); None if it is not one."""
    if isinstance(goal, int | float):
        return "<=", float(goal)
    if isinstance(goal, dict) and ("min" in goal or "max" in goal):
        return (">=", float(goal["min"])) if "min" in goal else ("<=", float(goal["max"]))
    match = re.fullmatch(r"\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", str(goal))
    return (match[1], float(match[2])) if match else None


def lookup(record: dict, path: str) -> float | None:
    value: object = record
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    while isinstance(value, dict) and value:
        value = value["median"] if "median" in value else next(iter(value.values()))
    return float(value) if isinstance(value, int | float) else None


def rows_of(suite: str, record: dict) -> list[Row]:
    rows = []
    machine = record.get("machine") or record.get("device") or (f"{record['cpus']} cores" if "cpus" in record else "")
    for metric, goal in goals_of(suite, record).items():
        if metric == "note":  # words about the goals (the recovery suite writes one)
            continue
        parsed, value = spec(goal), lookup(record, metric)
        if parsed is None:
            shown, verdict = str(goal), "unreadable goal"
        else:
            shown = f"{parsed[0]} {parsed[1]:g}"
            verdict = "missing" if value is None else "ok" if OPS[parsed[0]](value, parsed[1]) else "short"
        rows.append(Row(suite, metric, value, shown, verdict, record.get("time", "?"), str(machine),
                        bool(record.get("tiny"))))
    return rows


def load(results: Path) -> dict[str, dict]:
    """{suite label: record} of results/*.json and results/gpu/*.json (labelled gpu/<suite>). Files that are no
    suite's result (gpu/device.json) are passed over."""
    found = {}
    for folder, prefix in ((results, ""), (results / "gpu", "gpu/")):
        for path in sorted(folder.glob("*.json")):
            record = json.loads(path.read_text())
            if isinstance(record, dict) and "suite" in record:
                found[prefix + record["suite"]] = record
    return found


def check(results: Path) -> tuple[list[Row], list[str]]:
    """(a row per goal, the suites without goals)."""
    rows, without = [], []
    for label, record in load(results).items():
        found = rows_of(label.removeprefix("gpu/"), record)
        for row in found:
            row.suite = label
        rows += found
        if not found:
            without.append(label)
    return rows, without


def _value(v: float | None) -> str:
    return "—" if v is None else f"{v:.3g}"


def markdown(rows: list[Row], without: list[str]) -> str:
    lines = ["| suite | metric | latest | goal | status | measured |", "|---|---|---|---|---|---|"]
    for r in rows:
        goal = r.goal.replace(">=", "≥").replace("<=", "≤")
        measured = f"{r.when.replace('T', ' ')[:16]}" + (f", {r.machine}" if r.machine else "")
        status = r.status if r.ok else f"**{r.status}**"
        lines.append(f"| {r.suite} | `{r.metric}` | {_value(r.value)} | {goal} | {status} | {measured} |")
    if without:
        lines.append(f"\nNo goals: {', '.join(without)} (information only).")
    return "\n".join(lines)


def rewrite_readme(readme: Path, block: str) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text.split(BEGIN, 1)[1]:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    note = "<!-- generated by `python -m bench check --readme` from bench/results/*.json: edit those, not this -->"
    readme.write_text(f"{head}{BEGIN}\n{note}\n{block}\n{END}{tail}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help=f"results directory (default {RESULTS})")
    p.add_argument("--readme", type=Path, nargs="?", const=ROOT / "README.md",
                   help="rewrite this README's bench block (default README.md)")
    args = p.parse_args(argv)
    rows, without = check(args.results)
    print(table([(r.suite, r.metric, _value(r.value), r.goal, r.status, r.when, r.machine) for r in rows],
                ("suite", "metric", "value", "goal", "status", "measured", "machine")))
    if without:
        print(f"no goals: {', '.join(without)}")
    short = [r for r in rows if not r.ok]
    for r in short:
        print(f"short: {r.suite} {r.metric} = {_value(r.value)}, goal {r.goal}: {r.status} (measured {r.when})")
    print(f"{len(rows) - len(short)} of {len(rows)} goals met" + (" (some from tiny runs)" if any(
        r.tiny for r in rows) else ""))
    if args.readme:
        rewrite_readme(args.readme, markdown(rows, without))
        print(f"-> {args.readme}")
    return 0
