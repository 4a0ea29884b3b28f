"""Horovod backend: horovodrun (gloo or MPI controller) starts the ranks; workers use Horovod's optimizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from launcher.backends import find_runner, runner
from launcher.commands import Cmd, LaunchPlan

INSTALL_HINT = "HINT: bash scripts/install_horovod.sh (builds horovod 0.28.1 with the C++17 fix)"


class HorovodBackend:
    name = "horovod"

    def build_commands(self, plan: LaunchPlan) -> list[Cmd]:
        hosts = plan.hosts or (("localhost", plan.nproc_per_node),)
        argv = [
            runner("horovodrun", plan.python),
            "-np", str(plan.world_size),
            "-H", ",".join(f"{h}:{n}" for h, n in hosts),
            f"--{plan.controller}",
            "--output-filename", str(self.log_dir(plan)),  # per-rank stdout/stderr files
        ]
        for key, value in plan.tuning.items():
            argv += [f"--{key}", value]
        # a script of the user's gets torchrun's variables too (workers.rank --horovod), so one written for
        # torchrun runs unmodified; the rendezvous address is the plan's, the same for every rank
        program = (*plan.program, "--comm", "horovod") if plan.builtin else ("-m", "workers.rank", "--horovod",
                                                                             *plan.program)
        argv += [plan.python, *program]
        env = {**plan.env, "LAUNCHER_ATTEMPT": str(plan.attempt), "MASTER_ADDR": plan.master_addr,
               "MASTER_PORT": str(plan.master_port)}
        return [Cmd(argv=tuple(argv), env=env, name="horovodrun",
                    rank_marker=plan.rank_marker, relabel=(r"\[(\d+)\]<std(?:out|err)>:", r"[rank\1]:"))]

    @staticmethod
    def log_dir(plan: LaunchPlan) -> Path:
        return plan.run_dir / "logs" / "horovod" / f"attempt_{plan.attempt}"

    def rank_log(self, plan: LaunchPlan, rank: int) -> Path | None:
        return self.log_dir(plan) / f"rank.{rank}" / "stderr"

    def check_available(self) -> str | None:
        spec = importlib.util.find_spec("horovod")
        if spec is None or not spec.submodule_search_locations or find_runner("horovodrun") is None:
            return f"horovod is not installed. {INSTALL_HINT}"
        # what `horovodrun --check-build` reports as "[X] PyTorch", without its seconds of imports:
        # the compiled PyTorch extension is there
        torch_dir = Path(spec.submodule_search_locations[0]) / "torch"
        if not list(torch_dir.glob("mpi_lib_v2*.so")):
            return f"horovod is installed without PyTorch support. {INSTALL_HINT}"
        return None
