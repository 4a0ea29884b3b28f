"""MPI backend: OpenMPI's mpirun starts one process per rank; mpi4py bootstraps torch.distributed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from launcher.backends import find_runner, runner
from launcher.plan.ssh import ssh_options
from launcher.plan.types import Cmd, LaunchPlan
from workers import contract

INSTALL_HINT = "HINT: apt-get install openmpi-bin libopenmpi-dev && pip install mpi4py"


class MpirunBackend:
    name = "mpi"

    def build_commands(self, plan: LaunchPlan) -> list[Cmd]:
        hosts = plan.hosts or (("localhost", plan.nproc_per_node),)
        argv = [runner("mpirun", plan.python), "-np", str(plan.world_size),
                "-H", ",".join(f"{h}:{n}" for h, n in hosts),
                "--bind-to", "none",  # each rank sets its own threads; MPI's core binding would pin them all to one
                "--tag-output",  # [job,rank]<stdout>: prefix per line
                "--output-filename", str(self.log_dir(plan))]  # per-rank stdout/stderr files
        if plan.flags.get("as_root"):
            argv.append("--allow-run-as-root")
        if plan.flags.get("oversubscribe"):
            argv.append("--oversubscribe")
        env = {**plan.env, contract.ATTEMPT_ENV: str(plan.attempt)}
        if plan.hosts:
            # other hosts get the launcher's NCCL_*/GLOO_*/… too, and rank 0's address as others reach it
            env = {**plan.forwarded_env, **env, "MASTER_ADDR": plan.master_addr}
            argv += ["--mca", "plm_rsh_args", " ".join(  # how mpirun's ssh reaches the hosts, as ours does
                ssh_options(config=plan.ssh_config, timeout=plan.ssh_timeout, keepalive=False))]
        for key, value in env.items():
            argv += ["-x", f"{key}={value}"]
        argv += [plan.python, "-m", contract.RANK_MODULE, "--mpi", *plan.program]  # MPI -> torchrun's env, then run
        return [Cmd(argv=tuple(argv), env=env, name="mpirun", rank_marker=plan.rank_marker,
                    relabel=(r"\[\d+,(\d+)\]<std(?:out|err)>:", r"[rank\1]:"))]

    @staticmethod
    def log_dir(plan: LaunchPlan) -> Path:
        return plan.run_dir / "logs" / "mpi" / f"attempt_{plan.attempt}"

    def rank_log(self, plan: LaunchPlan, rank: int) -> Path | None:
        return next(self.log_dir(plan).glob(f"*/rank.{rank}/stderr"), None)  # mpirun adds a job folder

    def check_available(self) -> str | None:
        if find_runner("mpirun") is None:
            return f"mpirun not found. {INSTALL_HINT}"
        if importlib.util.find_spec("mpi4py") is None:
            return f"mpi4py is not installed. {INSTALL_HINT}"
        return None
