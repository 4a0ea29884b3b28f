"""A real two-node Slurm cluster on this machine: munged, slurmctld and two slurmd (node1, node2).

Debian's slurm-wlm runs without systemd: every daemon is started here in the foreground with its own
config, ports, spool directories and munge socket, and stopped by PID (jobs are cancelled first).
Clients (sbatch, squeue, scontrol, scancel) find the cluster through ``SLURM_CONF``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workers.ports import free_ports

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")


@dataclass
class Cluster:
    dir: Path
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, check=check, env={**os.environ, **self.env},
                              timeout=60)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for word in out.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return "GONE"


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root"
    for tool in DAEMONS:
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install slurm-wlm munge)"
    return None


def _conf(d: Path, ports: list[int], cpus: int) -> str:
    nodes = "".join(f"NodeName=node{i} NodeHostname=localhost NodeAddr=127.0.0.1 Port={ports[i]} CPUs={cpus} "
                    f"RealMemory=2000 State=UNKNOWN\n" for i in (1, 2))
    return f"""ClusterName=launchertest
SlurmctldHost=localhost
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobRequeue=1
ReturnToService=2
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
KillWait=60
{nodes}PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


def _wait_idle(cluster: Cluster, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = cluster.run("sinfo", "--Node", "--noheader", "--format=%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2], strict=False))
        if states.get("node1") == "idle" and states.get("node2") == "idle":
            return
        if time.monotonic() > deadline:
            log = (cluster.dir / "slurmctld.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"Slurm nodes never became idle: {states}\n{log}")
        time.sleep(0.5)


@contextlib.contextmanager
def slurm_cluster(d: Path) -> Iterator[Cluster]:
    for sub in ("munge", "state", "spool/node1", "spool/node2"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    d.chmod(0o755)
    (d / "munge").chmod(0o755)  # munged checks its socket directory's permissions
    subprocess.run(["mungekey", "-c", "-k", str(d / "munge.key")], check=True, capture_output=True)
    (d / "munge.key").chmod(0o600)
    conf = d / "slurm.conf"
    conf.write_text(_conf(d, free_ports(3), cpus=max(2, os.cpu_count() or 2)))
    cluster = Cluster(d, conf)
    env = {**os.environ, **cluster.env}
    procs: list[subprocess.Popen] = []

    def start(*argv: str) -> None:
        log = open(d / f"{Path(argv[0]).name}-{len(procs)}.out", "w")  # noqa: SIM115 (lives as long as the daemon)
        procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))

    try:
        start("munged", "--foreground", "--force", f"--socket={d}/munge/munge.socket",
              f"--key-file={d}/munge.key", f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log",
              f"--seed-file={d}/munged.seed")
        deadline = time.monotonic() + 10
        while not (d / "munge" / "munge.socket").exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError("munged did not start: " + (d / "munged.log").read_text(errors="replace")[-1000:])
            time.sleep(0.1)
        start("slurmctld", "-D", "-i", "-f", str(conf))
        for node in ("node1", "node2"):
            start("slurmd", "-D", "-N", node, "-f", str(conf))
        _wait_idle(cluster)
        yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--user=root", "--full", "--signal=KILL", check=False)
            time.sleep(1)
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _kill_strays(conf)


def _kill_strays(conf: Path) -> None:
    """slurmstepd and job processes detach from slurmd; they all carry this cluster's SLURM_CONF."""
    mark = f"SLURM_CONF={conf}".encode()
    for proc_dir in Path("/proc").glob("[0-9]*"):
        pid = int(proc_dir.name)
        if pid == os.getpid():
            continue
        try:
            if mark in (proc_dir / "environ").read_bytes().split(b"\0"):
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
