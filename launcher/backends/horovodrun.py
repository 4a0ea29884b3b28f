"""Horovod backend: horovodrun (gloo or MPI controller) starts the ranks; workers use Horovod's optimizer."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

from launcher.plan import Cmd, LaunchPlan

INSTALL_HINT = "HINT: bash scripts/install_horovod.sh (builds horovod 0.28.1 with the C++17 fix)"


class HorovodBackend:
    name = "horovod"

    def build_commands(self, plan: LaunchPlan) -> list[Cmd]:
        hosts = plan.hosts or (("localhost", plan.nproc_per_node),)
        argv = [
            "horovodrun",
            "-np", str(plan.world_size),
            "-H", ",".join(f"{h}:{n}" for h, n in hosts),
            f"--{plan.controller}",
        ]
        for key, value in plan.tuning.items():
            argv += [f"--{key}", value]
        if plan.builtin:
            argv += [plan.python, *plan.program, "--comm", "horovod"]
        else:
            argv += [plan.python, *plan.program]
        return [Cmd(argv=tuple(argv), env=dict(plan.env), name="horovodrun")]

    def check_available(self) -> str | None:
        if importlib.util.find_spec("horovod") is None or shutil.which("horovodrun") is None:
            return f"horovod is not installed. {INSTALL_HINT}"
        probe = subprocess.run(["horovodrun", "--check-build"], capture_output=True, text=True, timeout=60)
        if "[X] PyTorch" not in probe.stdout:
            return f"horovod is installed without PyTorch support. {INSTALL_HINT}"
        return None
