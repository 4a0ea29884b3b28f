"""Run probe.py on every host at once (over ssh; this machine directly), then measure each host's link
to the first host, one link at a time.

The probes stay up after their report (``--serve``) and take link requests on stdin: the first host's probe is
rank 0 of every link in turn, the other host's probe rank 1. A link so costs no ssh connection or torch import of
its own, and nothing is left running: a probe ends at EOF on stdin, when the preflight ends, or after its own
deadline if the connection is gone.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.plan.ssh import remote_shell, ssh_argv

LOCAL_NAMES = ("localhost", "127.0.0.1")  # reached without ssh, as in the launch
PROBE_TIMEOUT_S = 150  # a host's report: torch imports on a busy machine plus the local all-reduce
LINK_TIMEOUT_S = 60  # one link: the probes give up connecting after 30 s


@dataclass(frozen=True)
class Target:
    """Where to probe and how to get there."""

    hosts: tuple[tuple[str, int | None], ...]  # (host, ranks it will run; None: not known)
    port: int | None  # the rendezvous port: checked on the first host, which binds it; None: not checked
    python: str
    workdir: Path
    env: Mapping[str, str]  # what every probe gets (the launcher's forwarded variables, PYTHONPATH)
    ssh_config: Path | None = None
    ssh_timeout: int = 10
    local: bool = False  # no hosts: this machine alone
    mb: float = 2.0  # all-reduce message size


@dataclass
class Host:
    name: str
    slots: int | None = None
    reachable: str = "yes"  # yes | no | local
    probe: dict[str, Any] | None = None  # launcher.preflight.probe's report; None when it could not run
    error: str = ""  # why there is no report
    link_gbps: float | None = None  # all-reduce with the first host
    link_error: str = ""


def probe_argv(target: Target, host: str, args: Sequence[str]) -> list[str]:
    """``-m launcher.preflight.probe ARGS`` on ``host``: directly on this machine, else over ssh (one quoted string,
    the working directory and the forwarded variables as for the launch: launcher/plan/ssh.py)."""
    inner = [target.python, "-m", "launcher.preflight.probe", *args]
    if target.local or host in LOCAL_NAMES:
        return inner
    remote = remote_shell(inner, workdir=target.workdir, env=target.env)
    return [*ssh_argv(host, config=target.ssh_config, timeout=target.ssh_timeout), remote]


class Probe:
    """One running probe: its report first, then one answer per request."""

    def __init__(self, argv: list[str], env: Mapping[str, str]) -> None:
        # a file, not a pipe: nobody has to drain it; closed in close()
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, env=dict(env))

    def read(self, timeout: float) -> dict[str, Any] | None:
        """The next JSON line; None if the probe ended first, or gave no answer in time (it is killed then)."""
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:  # skips anything else a login shell may print
                if line.startswith("{"):
                    return json.loads(line)
            return None
        except ValueError:
            return None
        finally:
            timer.cancel()

    def ask(self, request: str) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # it has ended: the read that follows says so
            pass

    def why(self) -> tuple[int | None, str]:
        """(exit code or None if still running, the last line it wrote to stderr)."""
        try:
            code: int | None = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self.stderr.seek(0)
        return code, (self.stderr.read().strip().splitlines() or [""])[-1]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # EOF: the probe ends
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def probe_host(target: Target, index: int, env: Mapping[str, str]) -> tuple[Host, Probe]:
    name, slots = target.hosts[index]
    host = Host(name, slots, reachable="local" if target.local or name in LOCAL_NAMES else "yes")
    args = ["--serve", "--mb", f"{target.mb:g}", *(["--ranks", str(slots)] if slots else [])]
    if index == 0 and target.port:
        args += ["--port", str(target.port)]
    if index == 0 and len(target.hosts) > 1:
        args.append("--loopback")  # the links' reference when only one can be measured
    probe = Probe(probe_argv(target, name, args), env)
    host.probe = probe.read(timeout=target.ssh_timeout + PROBE_TIMEOUT_S)
    if host.probe is None:
        code, last = probe.why()
        if code == 255 and host.reachable == "yes":  # ssh's own failure: connect, auth, name resolution
            host.reachable, host.error = "no", last or "no reason given"
        elif code in (None, -9):
            host.error = f"no answer within {target.ssh_timeout + PROBE_TIMEOUT_S} s"
        else:
            host.error = last or f"exit {code}"
    return host, probe


def probe_link(first: tuple[Host, Probe], other: tuple[Host, Probe], port: int) -> int | None:
    """A 2-rank gloo all-reduce between the two probes, the store on the first host at ``port``; sets
    ``other``'s link_gbps or link_error. Returns the port for the next link (None: the first probe has ended)."""
    (host0, probe0), (host, probe) = first, other
    probe0.ask(f"allreduce 0 {host0.name} {port}")
    probe.ask(f"allreduce 1 {host0.name} {port}")
    said = probe.read(LINK_TIMEOUT_S), probe0.read(LINK_TIMEOUT_S)  # rank 1's answer, rank 0's
    if said[1] and "gbps" in said[1]:
        host.link_gbps = said[1]["gbps"]
    else:  # rank 1's error first: it is the one that connects, and says to what
        why = [f"{h.name}: {a['error']}" if a else f"the probe on {h.name} ended ({p.why()[1] or 'no answer'})"
               for (h, p), a in zip((other, first), said, strict=True) if not a or "error" in a]
        host.link_error = why[0] if why else "no answer"
    return said[1].get("free_port") if said[1] else None


def gather(target: Target, env: Mapping[str, str]) -> list[Host]:
    """Every host's report, then its link to the first host (one at a time: every link ends there)."""
    with ThreadPoolExecutor(max_workers=min(32, len(target.hosts))) as pool:
        started = list(pool.map(lambda i: probe_host(target, i, env), range(len(target.hosts))))
    first = started[0]
    try:
        port = first[0].probe["free_port"] if first[0].probe else None
        for other in started[1:]:
            if first[0].probe is None or other[0].probe is None:
                continue  # no report: named already
            if port is None:
                other[0].link_error = f"not measured: the probe on {first[0].name} has ended"
            else:
                port = probe_link(first, other, port)
    finally:
        with ThreadPoolExecutor(max_workers=min(32, len(started))) as pool:
            list(pool.map(lambda hp: hp[1].close(), started))
    return [host for host, _ in started]
