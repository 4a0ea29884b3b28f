"""The ``recovery`` suite: how soon training runs again after a rank dies, and how soon a hang is reported.

    python -m bench recovery [--tiny]

Real ``python -m launcher`` runs, 2 CPU ranks, torchrun backend, the built-in trainer and its default model:

1. kill: ``--max-restarts 1``, a checkpoint every few steps, each step slowed by the tests' knob
   LAUNCHER_TEST_SLOW_STEP_S (tests/rank_hooks.py); once the first checkpoint exists rank 1 gets SIGKILL. The
   result is the launcher's own ``recovered_after_s`` in ``attempts/0/failure.json``: seconds from the failure (when the
   launcher saw the rank gone) to the first finished step of the restarted ranks. Once with the default
   ``--restart-backoff`` (1 s) and once with 0, so the backoff's share shows. Beside it, the timeline of the
   restart from what the run leaves behind: when the new rank processes started (/proc), when each entered
   ``workers.rank.setup`` (the mtime of its empty ``rank<R>.stacks``, created there: imports done), what
   they waited of the backoff (it counts from the failure), rank 0's ``ranks:`` and ``resuming from step``
   lines (timestamped here as the launcher relays them, so up to ~0.1 s late: torchrun tails the log files)
   and ``first_step_at``.
2. hang: ``LAUNCHER_TEST_HANG=1:3`` (rank 1 sleeps after step 3) and ``--hang-timeout 3``: seconds from the
   moment the timeout expired (the hung rank's last progress record + the timeout) to the launcher's
   ``launcher: hang:`` line on stderr (timestamped here as it arrives), and from that line to the launcher's
   exit (stacks collected, ranks killed).
3. imports: two ``python`` processes at once (as the restarted ranks do) time ``import workers.train`` and the
   imports the trainer does later, lazily: ``torch.utils.tensorboard`` (rank 0's summaries) and
   ``torch._dynamo`` (torch's optimizers import it in ``add_param_group``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT, Stat, bar_plot, interleaved, rank_pids, table
from bench.data_suite import Neighbours
from launcher.supervise.procs import alive, started
from workers import contract
from workers.contract import failure as failure_record
from workers.rank import backoff_ends

Result = tuple[dict[str, object], Callable[[Path], None], str]

GOAL_S = 5.0  # issue #16: kill -> first step after the restart, and hang timeout -> summary, on 2 CPU ranks
HANG_TIMEOUT_S = 3.0
SLOW_STEP_S = 0.1  # the kill lands mid-run, with time to spare before the run would end
RUN_TIMEOUT_S = 300.0
TEST_HOOKS = "tests.rank_hooks"  # the tests' knobs in the ranks (LAUNCHER_TEST_SLOW_STEP_S, _HANG)
PHASES = ("respawn", "imports", "backoff", "init", "resume", "first step")  # kill -> first step, in order
HANG_PHASES = ("ranks killed", "torchrun exited", "launcher's report", "exit")  # summary -> exit, in order


class Run:
    """``python -m launcher`` with every line of its stdout and stderr timestamped as it arrives."""

    def __init__(self, run_dir: Path, args: list[str], env: dict[str, str]) -> None:
        self.run_dir, self.started = run_dir, time.time()
        self.lines: list[tuple[float, str, str]] = []  # (wall time, "out" | "err", line)
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "--gpus", "2", "--run-dir", str(run_dir),
                                      *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **env})
        self.readers = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                        for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for r in self.readers:
            r.start()

    def _read(self, stream: object, name: str) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append((time.time(), name, line.rstrip("\n")))

    def wait(self) -> tuple[int, float]:
        """(exit code, wall time of the exit). A run past RUN_TIMEOUT_S gets SIGTERM (the launcher then stops
        its ranks; a SIGKILL would orphan them) and is an error."""
        try:
            code = self.proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
            raise RuntimeError(f"launcher still running after {RUN_TIMEOUT_S:g} s:\n{self.tail()}") from None
        ended = time.time()
        for r in self.readers:
            r.join(timeout=10)
        return code, ended

    def first(self, stream: str, text: str, after: float = 0.0) -> float | None:
        """When the first line of ``stream`` containing ``text`` arrived after ``after``."""
        return next((t for t, s, line in self.lines if s == stream and t > after and text in line), None)

    def tail(self) -> str:
        return "\n".join(line for _, _, line in self.lines[-40:])




def started_at(pid: int) -> float | None:
    """Wall time the process started, to 10 ms: its age from /proc (btime in /proc/stat is whole seconds)."""
    ticks = started(pid)
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    return None if ticks is None else time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def runner_pid(run_dir: Path) -> int | None:
    """The run's torchrun process."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if b"torch.distributed.run" in cmdline and str(run_dir).encode() in cmdline:
            return int(proc.name)
    return None


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _record(path: Path) -> dict | None:
    """A progress record, or None if caught mid-write (it is rewritten in place)."""
    try:
        return _json(path)
    except (OSError, ValueError):
        return None


def kill_once(backoff: float, steps: int, timelines: list[dict[str, float]]) -> float:
    """One run, rank 1 killed after the first checkpoint: the launcher's recovered_after_s. The restart's
    timeline (seconds from the kill) goes to ``timelines``."""
    args = ["--max-restarts", "1", "--restart-backoff", f"{backoff:g}", f"trainer.max_steps={steps}",
            "trainer.checkpoint_every=5", "trainer.eval_every=1000000", "trainer.threads=1"]
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        run = Run(run_dir, args, {"LAUNCHER_HOOKS": TEST_HOOKS, "LAUNCHER_TEST_SLOW_STEP_S": f"{SLOW_STEP_S:g}"})
        old: dict[int, int] = {}
        while len(old) < 2 or not any((run_dir / "checkpoints").glob("step-*.json")):  # the manifest: complete
            if run.proc.poll() is not None:
                raise RuntimeError(f"the run ended before a checkpoint and 2 ranks were seen:\n{run.tail()}")
            time.sleep(0.05)
            old = rank_pids(run_dir)
        killed = time.time()
        os.kill(old[1], signal.SIGKILL)
        new = run_dir / "attempts" / "1"
        respawned: list[float] = []
        while run.proc.poll() is None and not respawned:
            # a restarted rank names its pid in its progress record once its imports are done, and lives on
            # for seconds: its start time is still in /proc. (Cheaper than scanning /proc while it imports.)
            respawned = [t for p in new.glob("rank*.progress") if (r := _record(p)) and (t := started_at(r["pid"]))]
            time.sleep(0.1)
        code, _ = run.wait()
        if code != 0:
            raise RuntimeError(f"the restarted run failed (exit {code}):\n{run.tail()}")
        failure = failure_record.read(contract.failure_file(contract.attempt_dir(run_dir, 0)))
        if failure is None or failure.recovered_after_s is None:
            raise RuntimeError(f"no recovery in attempt 0's failure record:\n{run.tail()}")
        first = min(_json(p)["first_step_at"] for p in new.glob("rank*.progress"))
        setup = min(p.stat().st_mtime for p in new.glob("rank*.stacks"))  # created in setup(), then left empty
        ranks_line = run.first("out", "[rank0]:ranks:", killed)
        resume_line = run.first("out", "[rank0]:resuming from step", killed)
        waited_to = max(setup, backoff_ends(run_dir, 1, backoff, setup))  # as the ranks wait
        marks = [min(respawned) if respawned else None, setup, waited_to, ranks_line, resume_line, first]
        if None in marks:
            raise RuntimeError(f"incomplete restart timeline {marks}:\n{run.tail()}")
        timeline = dict(zip(PHASES, (b - a for a, b in zip([killed, *marks], marks, strict=False)), strict=True))
        timeline["launcher_detect"] = failure.at - killed  # the start of recovered_after_s's clock
        timeline["kill_to_first_step"] = first - killed
        # for scale: the same launch's own start, launcher to first step (no checkpoint to load)
        timeline["fresh_launch"] = min(_json(p)["first_step_at"] for p in (run_dir / "attempts" / "0").glob(
            "rank*.progress")) - run.started
        timelines.append(timeline)
        return float(failure.recovered_after_s)


def hang_once(steps: int, timelines: list[dict[str, float]]) -> float:
    """One run with rank 1 hung after step 3: seconds from the timeout's expiry to the summary on stderr.
    What follows the summary, up to the launcher's exit, goes to ``timelines`` (seconds, consecutive)."""
    args = ["--hang-timeout", f"{HANG_TIMEOUT_S:g}", f"trainer.max_steps={steps}", "trainer.eval_every=1000000",
            "trainer.checkpoint_every=1000000", "trainer.threads=1"]
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        run = Run(run_dir, args, {"LAUNCHER_HOOKS": TEST_HOOKS, "LAUNCHER_TEST_HANG": "1:3"})
        runner, runner_gone = None, None
        while run.proc.poll() is None and runner_gone is None:  # when torchrun exits: no line says so
            runner = runner or runner_pid(run_dir)
            if runner is not None and not alive(runner):
                runner_gone = time.time()
            time.sleep(0.05)
        code, ended = run.wait()
        summary = run.first("err", "launcher: hang:")
        folder = contract.attempt_dir(run_dir, 0)
        failure = failure_record.read(contract.failure_file(folder))
        if summary is None or code != 124 or failure is None:
            raise RuntimeError(f"expected a hang report and exit 124, got exit {code}:\n{run.tail()}")
        hung = contract.rank_file(folder, failure.rank, contract.PROGRESS)
        stalled_from = _json(hung)["at"]  # the hung rank's last record
        # after the summary: stacks (SIGUSR2) and SIGKILL to the ranks, torchrun sees them die ("failed (exitcode"
        # on its output) and exits, then the launcher prints its own report and exits
        # torchrun's line comes on another pipe than the summary: its arrival here is not ordered with it
        marks = [summary, run.first("out", "failed (exitcode"), runner_gone,
                 run.first("err", "launcher: attempt 0 hung", summary), ended]
        if None in marks:
            raise RuntimeError(f"incomplete hang timeline {marks}:\n{run.tail()}")
        timelines.append({**dict(zip(HANG_PHASES, (b - a for a, b in zip(marks, marks[1:], strict=False)),
                                     strict=True)), "summary_to_exit": ended - summary})
        return summary - (stalled_from + failure.timeout_s)


IMPORTS = """
import json, time
t = [time.perf_counter()]
import workers.train
t.append(time.perf_counter())
import torch.utils.tensorboard
t.append(time.perf_counter())
import torch._dynamo
t.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(t, t[1:])]))
"""


def imports_once(parts: list[dict[str, float]]) -> float:
    """Two interpreters at once, as two restarted ranks: seconds of their imports (the slower one's)."""
    procs = [subprocess.Popen([sys.executable, "-c", IMPORTS], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    runs = [json.loads(p.communicate(timeout=RUN_TIMEOUT_S)[0].strip().splitlines()[-1]) for p in procs]
    slow = max(runs, key=sum)
    parts.append(dict(zip(("workers.train", "torch.utils.tensorboard", "torch._dynamo"), slow, strict=True)))
    return sum(slow)


def recovery(repeats: int, tiny: bool) -> Result:
    """Kill -> first step after the restart (backoff 1 s and 0 s); hang timeout -> summary -> exit."""
    steps = 20 if tiny else 40
    backoffs = {"backoff 1 s": 1.0} if tiny else {"backoff 1 s": 1.0, "backoff 0 s": 0.0}
    kills: dict[str, list[dict[str, float]]] = {name: [] for name in backoffs}
    hangs: list[dict[str, float]] = []
    imports: list[dict[str, float]] = []
    measures: dict[str, Callable[[], float]] = {
        f"kill, {name}": (lambda b=b, name=name: kill_once(b, steps, kills[name])) for name, b in backoffs.items()}
    measures["hang"] = lambda: hang_once(steps, hangs)
    if not tiny:  # supporting evidence for the breakdown, not a goal: left out of the smoke run
        measures["imports"] = lambda: imports_once(imports)
    neighbours = Neighbours()  # this machine is shared: how busy the rest of it was, per measurement
    stats = interleaved({name: neighbours.measure(fn) for name, fn in measures.items()}, repeats)
    busy = max(neighbours.shares, default=None)

    def per_key(records: list[dict[str, float]]) -> dict[str, Stat]:
        return {k: Stat.of([r[k] for r in records]) for k in records[0]}

    def dicts(stats: dict[str, Stat]) -> dict[str, object]:
        return {k: v.as_dict() for k, v in stats.items()}

    recovery_s = {name: stats[f"kill, {name}"] for name in backoffs}
    breakdown = {name: per_key(rows) for name, rows in kills.items()}
    hang_s, hang_after = stats["hang"], per_key(hangs)
    to_exit = hang_after["summary_to_exit"]
    met = {"recovery_s": recovery_s["backoff 1 s"].median <= GOAL_S, "hang_summary_s": hang_s.median <= GOAL_S}
    payload = {
        "recovery_s": dicts(recovery_s),
        "hang_summary_s": hang_s.as_dict(),
        "hang_exit_s": to_exit.as_dict(),
        "medians": {"recovery_s": {k: v.median for k, v in recovery_s.items()}, "hang_summary_s": hang_s.median,
                    "hang_exit_s": to_exit.median},
        "goals": {"recovery_s": GOAL_S, "hang_summary_s": GOAL_S,
                  "note": "recovery_s with the default --restart-backoff (1 s); both on 2 CPU ranks (issue #16)"},
        "met": met,
        "breakdown_s": {name: dicts(b) for name, b in breakdown.items()},
        "hang_breakdown_s": dicts(hang_after),
        "imports_s": dicts({"total": stats["imports"], **per_key(imports)}) if imports else None,
        "method": "recovery_s: attempts/0/failure.json recovered_after_s (the launcher saw the rank gone -> first "
                  "step of the restart). breakdown_s, consecutive phases from the SIGKILL: respawn (-> new rank "
                  "processes start, /proc), imports (-> workers.rank.setup: rank<R>.stacks mtime), backoff "
                  "(what the ranks waited of it: the configured backoff counts from the failure, so imports that take "
                  "longer hide it), init (-> rank 0's 'ranks:' line: config, rendezvous, task incl. data, optimizer, "
                  "pre-flight), resume (-> 'resuming from step': DDP wrap, checkpoint load), first step (-> "
                  "first_step_at); lines are timestamped on arrival here, ~0.1 s after the rank printed them "
                  "(torchrun tails its log files); launcher_detect: kill -> failure.json 'at'; fresh_launch: the "
                  "same run's start, launcher -> attempt 0's first step. hang_summary_s: 'launcher: hang:' on "
                  "stderr - (hung rank's last progress 'at' + timeout_s). hang_breakdown_s: summary -> torchrun's "
                  "'failed (exitcode' line (stacks, SIGKILL) -> torchrun exited (/proc, polled every 50 ms) -> "
                  "the launcher's 'attempt 0 hung' report -> exit. imports_s: two interpreters at once (as the "
                  "two restarted ranks), the slower one: import workers.train, then torch.utils.tensorboard "
                  "and torch._dynamo, which the trainer imports later (rank 0's summaries; torch.optim's "
                  "add_param_group)",
        "cpus": os.cpu_count(),
        "neighbours_cpu_share": {"max": busy, "per_measurement": neighbours.shares},
        "config": {"ranks": 2, "backend": "torchrun", "steps": steps, "checkpoint_every": 5,
                   "slow_step_s": SLOW_STEP_S, "hang": "1:3", "hang_timeout_s": HANG_TIMEOUT_S},
    }

    def row(label: str, s: Stat, goal: bool) -> tuple[object, ...]:
        verdict = ("met" if s.median <= GOAL_S else "NOT met") if goal else ""
        return label, s.median, s.lo, s.hi, f"<= {GOAL_S:g} s: {verdict}" if goal else ""

    rows = [row(f"recovered_after_s, {name}", s, name == "backoff 1 s") for name, s in recovery_s.items()]
    rows += [row("hang timeout -> summary", hang_s, True), row("hang summary -> exit", to_exit, False)]
    text = table(rows, ("seconds", "median", "min", "max", "goal"))
    keys = [*PHASES, "kill_to_first_step", "launcher_detect", "fresh_launch"]
    text += "\n\nrestart after the kill, seconds from the previous mark (median):\n" + table(
        [(k, *(breakdown[name][k].median for name in backoffs)) for k in keys], ("phase", *backoffs))
    text += "\nhang, summary -> exit (median s): " + ", ".join(
        f"{k} {hang_after[k].median:.2f}" for k in HANG_PHASES)
    if imports:
        text += "\nimports, two interpreters at once (median s): " + ", ".join(
            f"{k} {v.median:.2f}" for k, v in per_key(imports).items())
    if busy is not None:
        text += f"\nother processes used up to {100 * busy:.0f}% of the machine's CPU during a measurement"
    plotted = {f"failure -> step\n{name}": s for name, s in recovery_s.items()}
    plotted |= {"hang timeout\n-> summary": hang_s, "hang summary\n-> exit": to_exit}
    return payload, lambda p: bar_plot(p, f"recovery, 2 CPU ranks (goal <= {GOAL_S:g} s)", plotted, "seconds"), text
