"""Run a plan: write the run directory, start the commands under the supervisor, restart, report failures."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

from launcher.backends import get_backend, torchft
from launcher.backends.horovodrun import HorovodBackend
from launcher.errors import UsageError
from launcher.plan.types import Cmd, LaunchPlan
from launcher.supervise import elastic_hang
from launcher.supervise.respawn import Respawn
from launcher.supervise.supervisor import Supervisor, not_restarting
from launcher.supervise.watch import Timeouts, Watch
from launcher.supervise.watch import describe as watch_describe
from workers import contract
from workers.config import to_yaml


def rank_layout(per_node: list[int], most: int = 3) -> str:
    """Ranks per node, equal counts folded: ``8 ranks on each of 998 nodes, 4 on 2``. A few thousand hosts stay
    one short line: the ``most`` commonest counts are named, the rest only counted (the world size is on
    its own line)."""
    groups = Counter(per_node).most_common()
    (ranks, nodes), rest = groups[0], groups[1:]
    parts = [f"{ranks} rank{'s' * (ranks != 1)} on " + (f"each of {nodes} nodes" if nodes > 1 else "1 node")]
    parts += [f"{r} on {n}" for r, n in rest[:most - 1]]
    if others := rest[most - 1:]:
        parts.append(f"other counts on {sum(n for _, n in others)} more")
    return ", ".join(parts)


def describe(plan: LaunchPlan) -> str:
    """The plan as an aligned block, then each command exactly as it will run."""
    facts = {"backend": plan.backend, "device": plan.device + (" (NCCL)" if plan.device == "cuda" else " (gloo)"),
             "nodes": f"{plan.min_nodes}:{plan.nnodes} (elastic)" if plan.elastic else plan.nnodes,
             "ranks": rank_layout([n for _, n in plan.hosts] or [plan.nproc_per_node] * plan.nnodes),
             "world size": plan.world_size,
             "node rank": plan.node_rank, "master": f"{plan.master_addr}:{plan.master_port}",
             "max restarts": plan.max_restarts,
             "hang timeouts": "init {:g} s, step {:g} s, checkpoint {:g} s".format(*plan.timeouts),
             "run dir": plan.run_dir}
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
    # an earlier launch's rank records would read as this one's (attempt numbers start at 0 again); checkpoints
    # and TensorBoard go too under --no-resume. Node 0 does it before any rank can start.
    kept = (*((contract.checkpoint_dir(run_dir), contract.tensorboard_dir(run_dir)) if fresh else ()),
            contract.attempts_dir(run_dir), contract.failure_file(run_dir))
    old = [d for d in kept if d.exists()] if plan.node_rank == 0 else []
    if old:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = run_dir / "previous" / stamp
        for n in range(1, 1000):  # two launches in one second keep both
            if not aside.exists():
                break
            aside = run_dir / "previous" / f"{stamp}-{n}"
        aside.mkdir(parents=True)
        for d in old:
            d.rename(aside / d.name)
        if fresh:
            print(f"launcher: --no-resume: moved earlier {', '.join(d.name for d in old)} to {aside}")
    if history is not None:
        history.parent.mkdir(exist_ok=True)
        contract.config_file(run_dir).replace(history)
    if config_yaml is not None:
        contract.config_file(run_dir).write_text(config_yaml)
    if plan.fault_tolerant and plan.backend == "horovod":  # Horovod Elastic polls it for the hosts
        HorovodBackend.write_discovery(plan)
    if plan.backend == "horovod" and plan.hosts:  # horovodrun's own ssh to the hosts
        HorovodBackend.write_ssh(plan)
    record = {k: v for k, v in asdict(plan).items() if k != "commands"}
    record["commands"] = [{"name": c.name, "argv": list(c.argv), "env": dict(c.env)} for c in plan.commands]
    contract.plan_file(run_dir).write_text(json.dumps(record, indent=1, default=str))


def group_watches(plan: LaunchPlan) -> dict[int, Watch]:
    """--fault-tolerant: command index -> the watch over that replica group's records (RUN_DIR/groups/G)."""
    if not plan.fault_tolerant or plan.backend != "torchrun":
        return {}
    return {i: Watch(Path(cmd.env[contract.RUN_DIR_ENV]), Timeouts(*plan.timeouts), world_size=1)
            for i, cmd in enumerate(plan.commands) if not cmd.service}


def respawn(plan: LaunchPlan) -> Respawn | None:
    """--fault-tolerant across hosts: how a group whose host was lost is started there again (respawn.py)."""
    if not (plan.fault_tolerant and plan.backend == "torchrun" and plan.hosts):
        return None
    groups = torchft.placement(plan)
    services = len(plan.commands) - len(groups)  # the lighthouse comes first

    def build(index: int, attempt: int) -> Cmd:
        group, host, slot = groups[index - services]
        return torchft.group_command(plan, group, slot, host, attempt)
    return Respawn(build, budget=plan.max_restarts, backoff_s=float(plan.env.get(contract.RESTART_BACKOFF_ENV, 1)))


def launch(plan: LaunchPlan, cfg: object | None, *, fresh: bool, history: Path | None) -> int:
    """Start the job and see it through; the exit code is the launcher's (see launcher/__init__.py)."""
    prepare_run_dir(plan, to_yaml(cfg) if cfg is not None else None, fresh=fresh, history=history)
    if plan.device == "cpu":
        per_node = ",".join(str(n) for _, n in plan.hosts) if plan.hosts else plan.nproc_per_node
        print(f"launcher: no CUDA device found: running {per_node} CPU rank(s) per node on gloo")
    print("launcher: starting\n" + describe(plan), flush=True)
    backend = get_backend(plan.backend)
    watch = Watch(plan.run_dir, Timeouts(*plan.timeouts), world_size=plan.world_size,
                  log_of=lambda rank, attempt: backend.rank_log(replace(plan, attempt=attempt), rank))
    # torchrun restarts its ranks itself (elastic agent); the launcher only stops it from restarting an
    # attempt that failed before its first step. For the other runners the launcher restarts.
    own_restarts = 0 if plan.backend == "torchrun" else plan.max_restarts
    runner_restarts = plan.max_restarts if plan.backend == "torchrun" and plan.builtin else 0
    for attempt in range(own_restarts + 1):
        if attempt:
            plan = replace(plan, attempt=attempt)
            plan = replace(plan, commands=tuple(backend.build_commands(plan)))
        # fault tolerant: each group has its own records, attempts and hang watch; the job goes on while one
        # group is left
        sup = Supervisor(list(plan.commands), watch=None if plan.fault_tolerant else watch,
                         restarts_left=runner_restarts,
                         min_nodes=1 if plan.fault_tolerant else
                         plan.min_nodes if plan.elastic and len(plan.commands) > 1 else None,
                         group_watches=group_watches(plan), respawn=respawn(plan))
        # Horovod Elastic: its own hang watch (a stuck worker is killed alone), while the supervisor runs
        with elastic_hang.watching(plan, sup):
            code = sup.run()
        if sup.signals:
            return code
        watch.poll()
        failure = watch.conclude()
        if code == 0:
            return 0
        print(watch_describe(failure, hosts=plan.nnodes > 1) if failure else
              f"launcher: {plan.backend} exited with code {code}; last lines:\n" + "\n".join(sup.output),
              file=sys.stderr, flush=True)
        if failure is not None:
            code = failure.exit_code
        if attempt == own_restarts:
            break
        if failure is not None and plan.builtin and not failure.first_step_reached:
            print(not_restarting(attempt), file=sys.stderr, flush=True)
            break
        print(f"launcher: restarting all ranks ({attempt + 1}/{own_restarts}); they resume from the newest "
              "checkpoint", file=sys.stderr, flush=True)
    return code
