"""Run a plan: write the run directory, start the commands under the supervisor, restart, report failures."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from launcher.commands import LaunchPlan
from launcher.errors import UsageError
from launcher.supervisor import Supervisor, find_failure
from workers.config import to_yaml


def describe(plan: LaunchPlan) -> str:
    """The plan as an aligned block, then each command exactly as it will run."""
    facts = {"backend": plan.backend, "device": plan.device + (" (NCCL)" if plan.device == "cuda" else " (gloo)"),
             "nodes": plan.nnodes,
             "ranks per node": ",".join(str(n) for _, n in plan.hosts) if plan.hosts else plan.nproc_per_node,
             "world size": plan.world_size,
             "node rank": plan.node_rank, "master": f"{plan.master_addr}:{plan.master_port}",
             "max restarts": plan.max_restarts, "run dir": plan.run_dir}
    lines = [f"  {k:<15} {v}" for k, v in facts.items()]
    for cmd in plan.commands:
        if cmd.env:
            lines.append(f"  [{cmd.name}] env: " + " ".join(f"{k}={shlex.quote(v)}" for k, v in cmd.env.items()))
        lines.append(f"  [{cmd.name}] cmd: {shlex.join(cmd.argv)}")
    return "\n".join(lines)


def prepare_run_dir(plan: LaunchPlan, config_yaml: str | None, fresh: bool, history: Path | None = None) -> None:
    """Write the resolved config and the plan. --no-resume moves old state aside; nothing is deleted.
    ``history``: where the config a resumed run replaces is kept (resume.check)."""
    run_dir = plan.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} is a file. HINT: pass another --run-dir or --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        old = [run_dir / d for d in ("checkpoints", "tb") if (run_dir / d).exists()]
        if old:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = run_dir / "previous" / stamp
            for n in range(1, 1000):  # two --no-resume launches in one second keep both
                if not aside.exists():
                    break
                aside = run_dir / "previous" / f"{stamp}-{n}"
            aside.mkdir(parents=True)
            for d in old:
                d.rename(aside / d.name)
            print(f"launcher: --no-resume: moved earlier {', '.join(d.name for d in old)} to {aside}")
    if history is not None:
        history.parent.mkdir(exist_ok=True)
        (run_dir / "config.yaml").replace(history)
    if config_yaml is not None:
        (run_dir / "config.yaml").write_text(config_yaml)
    record = {k: v for k, v in asdict(plan).items() if k != "commands"}
    record["commands"] = [{"name": c.name, "argv": list(c.argv), "env": dict(c.env)} for c in plan.commands]
    (run_dir / "plan.json").write_text(json.dumps(record, indent=1, default=str))


def launch(plan: LaunchPlan, cfg: object | None, *, fresh: bool, history: Path | None) -> int:
    """Start the job and see it through; the exit code is the launcher's."""
    prepare_run_dir(plan, to_yaml(cfg) if cfg is not None else None, fresh=fresh, history=history)
    if plan.device == "cpu":
        print(f"launcher: no CUDA device found: running {plan.nproc_per_node} CPU rank(s) per node on gloo")
    print("launcher: starting\n" + describe(plan), flush=True)
    # torchrun restarts its ranks itself (elastic agent); for the others the launcher does it
    restarts = 0 if plan.backend == "torchrun" else plan.max_restarts
    for attempt in range(restarts + 1):
        sup = Supervisor(list(plan.commands))
        code = sup.run()
        if code == 0 or sup.signals:
            return code
        print(failure_report(sup, plan, code), file=sys.stderr)
        if attempt < restarts:
            print(f"launcher: restarting all ranks ({attempt + 1}/{restarts}); they resume from the newest "
                  "checkpoint", file=sys.stderr, flush=True)
    return code


def failure_report(sup: Supervisor, plan: LaunchPlan, code: int) -> str:
    """Which rank failed and why, per failed node; a rank killed by a signal first (usually the cause)."""
    failures = []
    for cmd in sup.failed:
        failure = find_failure(list(sup.outputs[cmd.name]), plan.run_dir / "logs")
        if failure is not None:
            failure.node = cmd.name if len(plan.commands) > 1 else None
            failures.append(failure)
    if not failures:
        return f"launcher: {plan.backend} exited with code {code}; last lines:\n" + "\n".join(list(sup.output)[-20:])
    failures.sort(key=lambda f: f.exit_code >= 0)
    return "\n".join(f.describe() for f in failures)
