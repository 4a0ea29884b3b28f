"""torchrun backend: torch's own elastic launcher (torch.distributed.run) starts and watches the ranks."""

from __future__ import annotations

from pathlib import Path

from launcher.backends import torchft
from launcher.plan.ssh import ssh_node
from launcher.plan.types import Cmd, LaunchPlan

# torchrun prefixes each teed line with this; ${rank} is the global rank
LOG_LINE_PREFIX = "[rank${rank}]:"
LAST_CALL_S = 10


class TorchrunBackend:
    name = "torchrun"

    def build_commands(self, plan: LaunchPlan) -> list[Cmd]:
        if plan.fault_tolerant:  # torchft: a lighthouse and a torchrun per replica group
            return torchft.build_commands(plan)
        if not plan.hosts:  # this node only (one node, or one launcher per node)
            return [self.node_command(plan, plan.node_rank, plan.nproc_per_node, plan.master_addr)]
        # ssh fan-out from this node: every host runs its own torchrun, all meeting at the first host
        return [ssh_node(plan, host, self.node_command(plan, i, slots, host))
                for i, (host, slots) in enumerate(plan.hosts)]

    @staticmethod
    def node_command(plan: LaunchPlan, node_rank: int, nproc: int, local_addr: str) -> Cmd:
        argv = [
            plan.python, "-m", "torch.distributed.run",
            "--nnodes", f"{plan.min_nodes}:{plan.nnodes}" if plan.elastic else str(plan.nnodes),
            "--nproc-per-node", str(nproc),
            # c10d rendezvous on node 0: unlike the static one it starts a fresh round (and a fresh
            # store prefix) on every restart, so --max-restarts works
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{plan.master_addr}:{plan.master_port}",
            "--rdzv-id", plan.job_id,
            "--max-restarts", str(plan.max_restarts),
            # per-rank stdout/stderr files under RUN_DIR/logs, teed to the console with a rank prefix
            "--log-dir", str(plan.run_dir / "logs"),
            "--tee", "3",
        ]
        # no --node-rank: c10d rendezvous ignores it (and torchrun warns); it orders nodes as they join
        if plan.nnodes > 1:
            # say who hosts the rendezvous store and under which address, instead of letting torch guess
            # from the hostname (wrong wherever the hostname does not resolve to the address others use)
            # elastic: once MIN nodes are in, a round waits this long for the rest (torch's default: 30 s)
            conf = f"is_host={int(node_rank == 0)}" + (f",last_call_timeout={LAST_CALL_S}" if plan.elastic else "")
            argv += ["--rdzv-conf", conf]
            if node_rank == 0 or plan.hosts:
                argv += ["--local-addr", local_addr]
        argv += plan.rank_program  # `-m workers.train …` or `-m workers.rank script.py|-m module …`
        env = {**plan.env, "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": LOG_LINE_PREFIX}
        return Cmd(argv=tuple(argv), env=env, name=f"node{node_rank}", rank_marker=plan.rank_marker)

    def check_available(self) -> str | None:
        return None  # torch is a hard dependency

    def rank_log(self, plan: LaunchPlan, rank: int) -> Path | None:
        return None  # torchrun's file per rank and restart; the rank's exit record names it (workers/rank.py)
