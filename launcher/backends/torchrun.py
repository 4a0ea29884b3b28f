"""torchrun backend: torch's own elastic launcher (torch.distributed.run) starts and watches the ranks."""

from __future__ import annotations

from launcher.errors import UsageError
from launcher.plan import Cmd, LaunchPlan

# torchrun prefixes each teed line with this; ${rank} is the global rank
LOG_LINE_PREFIX = "[rank${rank}]:"


class TorchrunBackend:
    name = "torchrun"

    def build_commands(self, plan: LaunchPlan) -> list[Cmd]:
        if plan.hosts:
            raise UsageError("--hosts/--hostfile with the torchrun backend (ssh fan-out) is not supported yet. "
                             "HINT: run `python -m launcher --nodes N --node-rank I --master-addr HOST` on each "
                             "node, or use --backend horovod")
        argv = [
            plan.python, "-m", "torch.distributed.run",
            "--nnodes", str(plan.nnodes),
            "--nproc-per-node", str(plan.nproc_per_node),
            "--node-rank", str(plan.node_rank),
            # c10d rendezvous on node 0: unlike the static one it starts a fresh round (and a fresh
            # store prefix) on every restart, so --max-restarts works
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{plan.master_addr}:{plan.master_port}",
            "--rdzv-id", plan.run_dir.name,
            "--max-restarts", str(plan.max_restarts),
            # per-rank stdout/stderr files under RUN_DIR/logs, teed to the console with a rank prefix
            "--log-dir", str(plan.run_dir / "logs"),
            "--tee", "3",
        ]
        argv += plan.program  # `-m workers.train …`, `script.py …` or `-m module …`, as torchrun takes them
        env = {**plan.env, "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": LOG_LINE_PREFIX}
        return [Cmd(argv=tuple(argv), env=env, name=f"node{plan.node_rank}", rank_marker=plan.rank_marker)]

    def check_available(self) -> str | None:
        return None  # torch is a hard dependency
