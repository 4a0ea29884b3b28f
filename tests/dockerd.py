"""A Docker engine for the tests: the one already running, or a dockerd started here and stopped by its PID.

The started engine keeps its data root under ``~/.cache/launcher/docker`` (``LAUNCHER_CACHE``), so the base
image made by scripts/docker_base.sh and the build cache survive between test runs. Its socket, pid file and
exec root are its own (``/run/launcher-dockerd``), so it never collides with a system engine. One test
session at a time uses that data root (a file lock); an engine left behind by a killed session is found by
its pid file and stopped before a new one starts. Extra dockerd flags (e.g. ``--iptables=false``) can be
given in ``LAUNCHER_DOCKERD_ARGS``; on this project's machines the defaults work.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("LAUNCHER_CACHE") or Path.home() / ".cache" / "launcher") / "docker"
# short: a unix socket path is limited to 107 bytes, and containerd puts its sockets under the exec root
RUN = Path("/run/launcher-dockerd")
START_TIMEOUT_S = 90.0
LOCK_TIMEOUT_S = 1200.0  # another session's docker tests: a cold build takes minutes


class EngineUnavailable(Exception):
    """No Docker engine can be used or started here; the message says why."""


@dataclass
class Engine:
    host: str  # the DOCKER_HOST every docker and compose command gets

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """``docker ARGS`` against this engine; raises with its output when it fails and ``check`` is set."""
        proc = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {shlex.join(args)}: exit {proc.returncode}\n{proc.stdout[-3000:]}"
                                 f"\n{proc.stderr[-3000:]}")
        return proc

    @property
    def compose(self) -> list[str]:
        """Debian's docker-compose (v1) if installed, else the CLI plugin (v2): the compose file suits both."""
        if shutil.which("docker-compose"):
            return ["docker-compose"]
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
        raise EngineUnavailable("neither docker-compose nor `docker compose` is installed. HINT: (as root) "
                                "apt-get install docker-compose")


def answers(host: str, timeout: float = 20) -> bool:
    try:
        probe = subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                               env={**os.environ, "DOCKER_HOST": host}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


def running_engine() -> str | None:
    """DOCKER_HOST, or the system socket, if an engine answers there."""
    candidates = [os.environ.get("DOCKER_HOST", ""), "unix:///var/run/docker.sock"]
    return next((host for host in candidates if host and answers(host)), None)


@contextlib.contextmanager
def docker_engine() -> Iterator[Engine]:
    """An engine for the duration of the block: a running one as it is, else our own dockerd."""
    if shutil.which("docker") is None:
        raise EngineUnavailable("no docker CLI. HINT: (as root) apt-get install docker.io docker-compose")
    host = running_engine()
    if host is not None:
        yield Engine(host)
        return
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine answers, and starting dockerd needs root")
    if shutil.which("dockerd") is None:
        raise EngineUnavailable("no Docker engine answers and there is no dockerd. HINT: (as root) "
                                "apt-get install docker.io docker-compose debootstrap")
    with _exclusive(CACHE / "engine.lock"):
        _stop_leftovers()
        proc = _start_dockerd()
        try:
            yield Engine(f"unix://{RUN / 'docker.sock'}")
        finally:
            _stop(proc.pid, proc)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path``; wait for another session's to be released."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EngineUnavailable(f"another test session has held {lock_path} for "
                                            f"{LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _start_dockerd() -> subprocess.Popen:
    RUN.mkdir(parents=True, exist_ok=True)
    (CACHE / "data-root").mkdir(parents=True, exist_ok=True)
    host = f"unix://{RUN / 'docker.sock'}"
    argv = ["dockerd", "--data-root", str(CACHE / "data-root"), "--exec-root", str(RUN / "exec"),
            "--host", host, "--pidfile", str(RUN / "docker.pid"),
            *shlex.split(os.environ.get("LAUNCHER_DOCKERD_ARGS", ""))]
    log_path = RUN / "dockerd.log"
    with open(log_path, "w") as log:
        # a session of its own: a Ctrl-C meant for pytest must not kill the engine under running containers
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(host, timeout=5):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc.pid, proc)
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            how = f"exited with {proc.returncode}" if proc.returncode is not None else "did not answer in time"
            raise EngineUnavailable(f"dockerd {how} ({shlex.join(argv)}); last lines of {log_path}:\n{tail}")
        time.sleep(0.5)
    return proc


def _stop(pid: int, proc: subprocess.Popen | None = None, grace_s: float = 60) -> None:
    """SIGTERM (dockerd stops its containers and its containerd), then SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _alive(pid, proc) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid, proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if proc is not None:
            proc.wait(timeout=10)


def _alive(pid: int, proc: subprocess.Popen | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop_leftovers() -> None:
    """A dockerd (or its containerd) of an earlier session that was killed: stop it by its pid file.

    Only a process whose command line names our exec root is touched, never another engine."""
    for pid_file in (RUN / "docker.pid", RUN / "exec" / "containerd" / "containerd.pid"):
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(RUN).encode() in cmdline:
            _stop(pid)

