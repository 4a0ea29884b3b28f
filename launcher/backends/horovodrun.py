"""Horovod backend: horovodrun (gloo or MPI controller) starts the ranks; workers use Horovod's optimizer."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import socket
from pathlib import Path

from launcher.backends import find_runner, runner
from launcher.plan.ssh import ssh_options
from launcher.plan.types import Cmd, LaunchPlan
from workers import contract


def local_names() -> list[str]:
    """Distinct names horovodrun takes for this machine (it runs locally, without ssh, a host whose address is
    one of this machine's IPv4 addresses): localhost, 127.0.0.1 and each interface's other addresses."""
    import psutil  # horovodrun's own dependency

    addresses = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET]
    return ["localhost", "127.0.0.1", *sorted({a for a in addresses if a != "127.0.0.1"})]


def check_elastic(plan: LaunchPlan) -> str | None:
    """--backend horovod --fault-tolerant: on one node a name per rank (see write_discovery); else two hosts or more."""
    if len(plan.hosts) == 1:
        return (f"--backend horovod --fault-tolerant: Horovod Elastic drops a failed worker's whole host, so with one "
                f"host ({plan.hosts[0][0]}) any failure ends the job. HINT: list two hosts or more, or drop "
                "--hostfile/--hosts to run on this node with a host per rank")
    if plan.hosts or plan.nproc_per_node <= len(names := local_names()):
        return None
    return (f"--backend horovod --fault-tolerant: Horovod Elastic drops a failed worker's whole host, so each rank "
            f"here is a host of its own, and this machine has {len(names)} names for that ({', '.join(names)}). "
            f"HINT: --gpus {len(names)} or fewer, or --backend torchrun --fault-tolerant (torchft)")


INSTALL_HINT = "HINT: bash scripts/install_horovod.sh (builds horovod 0.28.1 with the C++17 fix)"


class HorovodBackend:
    name = "horovod"

    def build_commands(self, plan: LaunchPlan) -> list[Cmd]:
        hosts = plan.hosts or (("localhost", plan.nproc_per_node),)
        argv = [runner("horovodrun", plan.python), "-np", str(plan.world_size)]
        if plan.fault_tolerant:  # Horovod Elastic: the survivors go on at a smaller size, a worker back is added
            argv += ["--min-np", "1", "--max-np", str(plan.world_size),
                     "--host-discovery-script", str(contract.discovery_script(plan.run_dir))]
            if "network-interface" not in plan.tuning and not plan.hosts:
                # without one, horovodrun's elastic driver finds the interfaces common to the hosts, which takes
                # two hosts: on one it waits out --elastic-timeout (600 s) and starts nothing (gloo_run.py,
                # _get_min_start_hosts). One node talks over loopback; the hosts of a hostfile (two or more,
                # check_elastic) are probed over ssh at the start, as plain horovodrun does
                argv += ["--network-interface", "lo"]
            # a failed worker's host (here: its slot) is out for a second or two, then discovery's listing of it
            # starts a new worker there, which joins at the next commit
            argv += ["--blacklist-cooldown-range", "1", "2"]
        else:
            argv += ["-H", ",".join(f"{h}:{n}" for h, n in hosts)]
        argv += [f"--{plan.controller}", "--output-filename", str(self.log_dir(plan))]  # per-rank stdout/stderr
        for key, value in plan.tuning.items():
            argv += [f"--{key}", value]
        # a script of the user's gets torchrun's variables too (workers.rank --horovod), so one written for
        # torchrun runs unmodified; the rendezvous address is the plan's, the same for every rank
        program = (*plan.program, "--comm", "horovod") if plan.builtin else ("-m", contract.RANK_MODULE, "--horovod",
                                                                             *plan.program)
        argv += [plan.python, *program]
        env = {**plan.env, contract.ATTEMPT_ENV: str(plan.attempt), "MASTER_ADDR": plan.master_addr,
               "MASTER_PORT": str(plan.master_port)}
        if plan.fault_tolerant:  # each slot's own --max-restarts: Horovod would start a failed slot again for ever
            env[contract.MAX_RESTARTS_ENV] = str(plan.max_restarts)
        if plan.hosts:
            # horovodrun starts remote workers (and its interface probe) with a bare `ssh` found on PATH, without
            # -F (horovod/runner/util/remote.py): the launcher's wrapper (write_ssh), first on its PATH, adds the
            # options of the launcher's own ssh (--ssh-config, BatchMode, ConnectTimeout, keepalive)
            argv = ["sh", "-c", 'PATH="$0:$PATH" exec "$@"', str(self.ssh_dir(plan)), *argv]
        return [Cmd(argv=tuple(argv), env=env, name="horovodrun",
                    rank_marker=plan.rank_marker, relabel=(r"\[(\d+)\]<std(?:out|err)>:", r"[rank\1]:"))]

    @staticmethod
    def write_discovery(plan: LaunchPlan) -> None:
        """The host discovery script horovodrun polls under --fault-tolerant: it prints the hosts file beside it,
        ``host:slots`` per line: the hostfile's hosts, else (one node) a "host" of one slot per rank under a name
        of its own for this machine (:func:`local_names`), since Horovod Elastic takes a failed worker's whole host
        out of the job, its other workers too. A worker finds its GPU from the file (workers/distributed/elastic.py)."""
        script, listing = contract.discovery_script(plan.run_dir), contract.elastic_hosts_file(plan.run_dir)
        dropped = contract.elastic_dropped_file(plan.run_dir)  # slots past their budget (distributed/elastic.py)
        hosts = plan.hosts or tuple((name, 1) for name in local_names()[:plan.nproc_per_node])
        listing.write_text("".join(f"{h}:{n}\n" for h, n in hosts))
        dropped.write_text("")
        # grep -v -f of an empty file keeps every line; "|| true": no line left is an empty listing, not an error
        script.write_text(f"#!/bin/sh\ngrep -v -x -F -f {shlex.quote(str(dropped))} {shlex.quote(str(listing))} "
                          "|| true\n")
        script.chmod(0o755)

    @staticmethod
    def ssh_dir(plan: LaunchPlan) -> Path:
        return plan.run_dir / "horovod_ssh"

    @classmethod
    def write_ssh(cls, plan: LaunchPlan) -> None:
        """``ssh_dir/ssh``: ssh with the launcher's options, then horovodrun's (a host is reached as the launcher's
        pre-flight check and fan-out reach it). The real ssh by its full path: the wrapper is first on PATH."""
        real = shutil.which("ssh") or "/usr/bin/ssh"
        cls.ssh_dir(plan).mkdir(exist_ok=True)
        wrapper = cls.ssh_dir(plan) / "ssh"
        options = ssh_options(config=plan.ssh_config, timeout=plan.ssh_timeout)
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.join([real, *options])} "$@"\n')
        wrapper.chmod(0o755)

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
