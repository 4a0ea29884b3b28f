"""ssh fan-out: start each node's command on its host from one node, like DeepSpeed's multinode runner.

Every host runs ``ssh HOST 'cd WORKDIR && exec env K=V… PYTHON -m launcher.supervise.node -- ARGV…'``: the
same working directory (a shared filesystem, as on most clusters), the rank environment plus the
launcher's own NCCL_*/GLOO_*/TORCH*/… variables, and :mod:`launcher.supervise.node` in front of the command so
the remote side obeys the launcher over ssh's stdin (stop, checkpoint-now, kill) and never outlives
it. The remote command is one string, as ssh hands it to the remote shell: it is built with
``shlex.join`` from argv lists, never from user text pasted into a shell line.
"""

from __future__ import annotations

import functools
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from launcher.errors import UsageError
from launcher.plan.types import Cmd, LaunchPlan
from launcher.supervise.procs import TOKEN_VAR
from workers import contract

# the launcher's own variables that every remote rank gets too (DeepSpeed exports a similar list)
EXPORTED_PREFIXES = ("NCCL_", "GLOO_", "TORCH", "CUDA_", "OMP_", "MKL_", "PYTHON", "LAUNCHER_", "HOROVOD_",
                     "UCX_", "HF_")


SSH_FAILED = 255  # ssh's own exit code: connect, auth, name resolution, a lost connection (a remote command's own
# code is passed on)


def exported_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(EXPORTED_PREFIXES)}


def ssh_options(*, config: Path | None, timeout: int, keepalive: bool = True) -> list[str]:
    """The options of every ssh the launcher starts, and of mpirun's (``keepalive=False``: as it always ran)."""
    options = ["-o", "BatchMode=yes",  # never prompt: a password prompt would hang the launch
               "-o", f"ConnectTimeout={timeout}"]
    if keepalive:
        options += ["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6"]  # a dead host ends its node
    return options + (["-F", str(config)] if config is not None else [])


def ssh_argv(host: str, *, config: Path | None, timeout: int) -> list[str]:
    return ["ssh", *ssh_options(config=config, timeout=timeout), host]


# shlex.quote, remembered: a fan-out to thousands of hosts quotes the same few dozen words (env, interpreter, run
# directory) for every host, and quoting them anew was most of a large plan's time
_quote = functools.lru_cache(maxsize=4096)(shlex.quote)


def remote_shell(argv: Sequence[str], *, workdir: Path, env: Mapping[str, str]) -> str:
    """``cd WORKDIR && exec env K=V… ARGV…``: one string, as ssh hands it to the host's shell, every word quoted."""
    words = ["env", *(f"{k}={v}" for k, v in env.items()), *argv]
    return f"cd {_quote(str(workdir))} && exec {' '.join(map(_quote, words))}"


def remote_command(argv: Sequence[str], *, workdir: Path, python: str, env: Mapping[str, str],
                   marker: str) -> str:
    """The string ssh runs on the host: the node agent around ``argv``, every word quoted."""
    return remote_shell([python, "-m", "launcher.supervise.node", "--marker", marker, "--", *argv], workdir=workdir,
                        env=env)


def ssh_node(plan: LaunchPlan, host: str, cmd: Cmd) -> Cmd:
    """``cmd`` (one node's part of the job) run on ``host`` over ssh, under the node agent."""
    env = {**plan.forwarded_env, **cmd.env, contract.HOST_ENV: host}  # the ranks name their host as the launcher does
    remote = remote_command(cmd.argv, workdir=plan.workdir, python=plan.python, env=env, marker=cmd.rank_marker)
    # the ssh client is a process of the run too: it carries the run's token (launcher/supervise/reaper.py)
    token = {TOKEN_VAR: env[TOKEN_VAR]} if TOKEN_VAR in env else {}
    return Cmd(argv=(*ssh_argv(host, config=plan.ssh_config, timeout=plan.ssh_timeout), remote), env=token,
               name=host, rank_marker=cmd.rank_marker, remote=True)


def check_hosts(hosts: Sequence[str], *, config: Path | None, timeout: int, workdir: Path, python: str) -> None:
    """Pre-flight: every host answers over ssh and sees the working directory and the interpreter.

    Runs before anything starts; the first host that fails is a UsageError (exit 2) naming it."""
    probe = f"cd {shlex.quote(str(workdir))} && test -x {shlex.quote(python)}"

    def check(host: str) -> tuple[str, str] | None:
        try:
            proc = subprocess.run([*ssh_argv(host, config=config, timeout=timeout), probe], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return host, f"host {host} did not answer over ssh within {timeout}s"
        if proc.returncode == SSH_FAILED:
            why = (proc.stderr.strip().splitlines() or ["no reason given"])[-1]
            return host, f"host {host} is unreachable over ssh ({why})"
        if proc.returncode != 0:
            return host, f"host {host} lacks {workdir} or {python} (all hosts need one shared filesystem)"
        return None

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        problems = [p for p in pool.map(check, hosts) if p]
    if problems:
        host, why = problems[0]
        raise UsageError(f"{why}. HINT: check that `ssh {host} true` works without a password "
                         "(BatchMode), or fix the hostfile")
