"""Two "hosts" on one machine: network namespaces joined by a veth pair, each with its own sshd.

Both namespaces see the same filesystem (like a shared home directory), so the launcher, the run
directory and the interpreter are at the same paths on both. Host and client keys are throw-away,
made in a temp directory; a generated ssh config reaches both hosts as root without prompts.
Everything is torn down by PID: every process left in a namespace is killed before it is deleted.
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

SUBNET = "10.231.{}.{}"
IFNAME = "lnch0"  # the veth end's name inside each namespace (the same in both: GLOO_SOCKET_IFNAME)
SSHD = "/usr/sbin/sshd"
NETNS_ETC = Path("/etc/netns")  # per-namespace files `ip netns exec` mounts over /etc's


@dataclass
class Hosts:
    namespaces: list[str]
    addrs: list[str]
    ssh_config: Path
    dir: Path

    @property
    def hostnames(self) -> list[str]:
        return [f"{ns}-host" for ns in self.namespaces]

    def exec_argv(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``i``: its network namespace and a UTS namespace with its own hostname
        (OpenMPI tells nodes apart by hostname; two "hosts" named alike crash its shared-memory split)."""
        return ["ip", "netns", "exec", self.namespaces[i], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostnames[i], *argv]

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[i]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def why_not() -> str | None:
    """None when this machine can make the hosts; else the reason (tests skip with it)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "ssh", "ssh-keygen", SSHD):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install iproute2 openssh-server openssh-client)"
    probe = f"lnchprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


def _wait_for_ssh(hosts: Hosts, i: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(hosts.exec_argv(0, ["ssh", "-F", str(hosts.ssh_config), "-o", "BatchMode=yes",
                                                   "-o", "ConnectTimeout=2", hosts.addrs[i], "true"]),
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if probe.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd on {hosts.addrs[i]} never answered: {probe.stderr.strip()}")
        time.sleep(0.2)


@contextlib.contextmanager
def two_hosts(workdir: Path, subnet: int = 0) -> Iterator[Hosts]:
    tag = f"lnch{os.getpid() % 100000}{subnet}"
    hosts = Hosts(namespaces=[f"{tag}a", f"{tag}b"], addrs=[SUBNET.format(subnet, 1), SUBNET.format(subnet, 2)],
                  ssh_config=workdir / "ssh_config", dir=workdir)
    sshds: list[subprocess.Popen] = []
    try:
        for ns in hosts.namespaces:
            _run("ip", "netns", "add", ns)
            # each host's name resolves to its address, as on a cluster: `ip netns exec` mounts /etc/netns/NS/hosts
            # over /etc/hosts. (Horovod's gloo process sets ignore HOROVOD_GLOO_IFACE and bind to the hostname's
            # address: horovod 0.28.1, gloo_context.cc InitializeForProcessSet)
            etc = NETNS_ETC / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(Path("/etc/hosts").read_text() + "".join(
                f"{addr} {name}\n" for addr, name in zip(hosts.addrs, hosts.hostnames, strict=True)))
        _run("ip", "link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")
        for ns, end, addr in zip(hosts.namespaces, (f"{tag}x", f"{tag}y"), hosts.addrs, strict=True):
            _run("ip", "link", "set", end, "netns", ns)
            _run("ip", "-n", ns, "link", "set", end, "name", IFNAME)
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            _run("ip", "-n", ns, "link", "set", IFNAME, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "host_key"))
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / "client_key"))
        shutil.copy(workdir / "client_key.pub", workdir / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        hosts.ssh_config.write_text(
            f"Host {SUBNET.format(subnet, '*')}\n  User root\n  IdentityFile {workdir / 'client_key'}\n"
            "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
        for i, addr in enumerate(hosts.addrs):
            conf = workdir / f"sshd_config_{i}"
            conf.write_text(
                f"ListenAddress {addr}\nHostKey {workdir / 'host_key'}\nPidFile {workdir}/sshd_{i}.pid\n"
                f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nStrictModes no\nPermitRootLogin yes\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPrintMotd no\n"
                "MaxStartups 100\nMaxSessions 100\nLogLevel ERROR\n")
            sshds.append(subprocess.Popen(hosts.exec_argv(i, [SSHD, "-D", "-e", "-f", str(conf)]),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for i in range(2):
            _wait_for_ssh(hosts, i)
        yield hosts
    finally:
        for proc in sshds:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        for i, ns in enumerate(hosts.namespaces):
            with contextlib.suppress(Exception):
                for pid in hosts.pids(i):  # whatever a test left running in this "host"
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
        with contextlib.suppress(OSError):  # made here, unless another test's hosts still use it
            NETNS_ETC.rmdir()
        for proc in sshds:
            proc.wait()
