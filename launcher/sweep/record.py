"""What a sweep knows about its members, on disk: ``members.json`` (the sweep directory's list of members),
``member.json`` (each member's status, in its run directory) and ``summary.csv`` (one row per member).

Everything is read back from files, so a local sweep, a rerun and the tasks of a Slurm job array (each
calls ``python -m launcher.sweep.record start|end SWEEP_DIR INDEX …``, see launcher/slurm/submit.py) see the
same state. Imports stay light: the array task's ``start`` runs before the launcher does.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workers import contract
from workers.files import read_json, write_json, write_text

MEMBERS = "members.json"  # in the sweep directory: [{index, name, overrides, params, max_steps}, ...]
STATUS = "member.json"  # in a member's run directory: its identity and how it ended
SUMMARY = "summary.csv"
# status: pending (never started), running, finished, failed (exit_code), stopped (SIGINT/SIGTERM),
# preempted (Slurm requeued it)


@dataclass(kw_only=True)
class Member:
    """One run of a sweep, as members.json lists it."""

    index: int  # its place in the sweep (the Slurm array task id)
    name: str  # ``<index>-<key=value,…>``: its run directory under the sweep directory
    overrides: list[str]  # the config overrides it runs with
    params: dict[str, str] = field(default_factory=dict)  # the swept keys' values (summary.csv's columns)
    max_steps: int | None = None  # its trainer.max_steps (what "finished" means), once its config was composed

    def run_dir(self, sweep_dir: Path) -> Path:
        return sweep_dir / self.name

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if self.max_steps is None:
            del data["max_steps"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Member:
        return cls(index=data["index"], name=data["name"], overrides=list(data["overrides"]),
                   params=dict(data.get("params", {})), max_steps=data.get("max_steps"))


def members(sweep_dir: Path) -> list[Member]:
    data = read_json(sweep_dir / MEMBERS)
    return [Member.from_json(m) for m in data["members"]] if isinstance(data, dict) else []


def write_members(sweep_dir: Path, listed: list[Member]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json(sweep_dir / MEMBERS, {"sweep": sweep_dir.name, "members": [m.to_json() for m in listed]})


def status(run_dir: Path) -> dict[str, Any]:
    return read_json(run_dir / STATUS) or {}


def update_status(run_dir: Path, member: Member, **fields: Any) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**status(run_dir), "index": member.index, "name": member.name, "overrides": member.overrides,
              **fields}
    write_json(run_dir / STATUS, record)
    return record


def result(run_dir: Path) -> dict[str, Any]:
    data = read_json(contract.result_file(run_dir))
    return data if isinstance(data, dict) else {}


def finished(run_dir: Path, max_steps: int) -> bool:
    """The member's run reached its last step: result.json holds it (max_steps 0, an online stream: any result)."""
    step = result(run_dir).get("step")
    return isinstance(step, int) and step >= max_steps


def final_train_loss(run_dir: Path) -> float | None:
    """The last ``train/loss`` in the member's TensorBoard (result.json holds eval metrics only)."""
    tb = contract.tensorboard_dir(run_dir)
    if not list(tb.glob("events.*")):
        return None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 1})  # the reservoir keeps the last
    acc.Reload()
    if "train/loss" not in acc.Tags().get("scalars", []):
        return None
    return acc.Scalars("train/loss")[-1].value


def summary_rows(sweep_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows): index, member, status, exit code, one column per swept key, step, train/loss, each eval
    metric of result.json, wall time, the member's overrides."""
    listed = members(sweep_dir)
    params = list(dict.fromkeys(k for m in listed for k in m.params))
    rows, metrics = [], {}
    for m in listed:
        run_dir = m.run_dir(sweep_dir)
        st, res = status(run_dir), result(run_dir)
        metrics.update(dict.fromkeys(k for k in res if k != "step"))
        loss = final_train_loss(run_dir)
        rows.append({"index": m.index, "member": m.name, "status": st.get("status", "pending"),
                     "exit_code": st.get("exit_code", ""), **m.params, "step": res.get("step", ""),
                     "train/loss": "" if loss is None else f"{loss:.6g}",
                     **{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in res.items() if k != "step"},
                     "wall_s": f"{st['wall_s']:.1f}" if "wall_s" in st else "", "overrides": " ".join(m.overrides)})
    columns = ["index", "member", "status", "exit_code", *params, "step", "train/loss", *metrics, "wall_s",
               "overrides"]
    return columns, rows


def write_summary(sweep_dir: Path) -> Path:
    """Rewrite summary.csv from the members' files. Array tasks end concurrently: a lock keeps each rewrite
    whole and in order, so the last one to finish writes a summary that includes everyone."""
    path = sweep_dir / SUMMARY
    with open(sweep_dir / ".summary.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        columns, rows = summary_rows(sweep_dir)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_text(path, text.getvalue())
    return path


def task_start(sweep_dir: Path, index: int) -> list[str]:
    """An array task's member: ``["run", RUN_DIR, *overrides]``, or ``["skip"]`` when it has finished already."""
    member = members(sweep_dir)[index]
    run_dir = member.run_dir(sweep_dir)
    if member.max_steps is None:
        raise KeyError(f"max_steps of member {member.name}")  # the launcher always writes it: a broken file
    if finished(run_dir, member.max_steps):
        update_status(run_dir, member, status="finished", exit_code=0)
        return ["skip"]
    update_status(run_dir, member, status="running", started=time.time(), exit_code="")
    return ["run", str(run_dir), *member.overrides]


def task_end(sweep_dir: Path, index: int, code: int, preempted: bool) -> None:
    member = members(sweep_dir)[index]
    run_dir = member.run_dir(sweep_dir)
    st = status(run_dir)
    wall = st.get("wall_s", 0.0) + (time.time() - st["started"] if "started" in st else 0.0)
    state = "preempted" if preempted else "finished" if code == 0 else "failed"
    update_status(run_dir, member, status=state, exit_code=code, wall_s=wall)
    write_summary(sweep_dir)


def main(argv: list[str]) -> int:
    """``start SWEEP_DIR INDEX`` prints the member NUL-separated (the sbatch script reads it with mapfile -d '');
    ``end SWEEP_DIR INDEX CODE PREEMPTED`` records how it ended and rewrites summary.csv."""
    try:
        verb, sweep_dir, index = argv[0], Path(argv[1]), int(argv[2])
        if verb == "start":
            sys.stdout.write("".join(f"{word}\0" for word in task_start(sweep_dir, index)))
            return 0
        if verb == "end":
            task_end(sweep_dir, index, int(argv[3]), argv[4] == "1")
            return 0
    except (IndexError, ValueError, KeyError, OSError) as e:
        print(f"launcher.sweep.record: {' '.join(argv)}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(f"launcher.sweep.record: unknown command {argv[0]!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
