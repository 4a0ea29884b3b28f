"""No orphans, ever: SIGKILL of the launcher leaves no process of its run, on every backend, locally and over ssh,
within 10 s — and processes of other jobs are never touched.

Each run gets its own LAUNCHER_JOB_TOKEN from the test (the launcher uses the one in its environment), so the
run's processes are found by their environment, whatever their command lines, parents or sessions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    TOKEN_VAR,
    leftover_token_processes,
    rank_pids,
    start,
    token_processes,
    wait_for,
)
from netns_hosts import Hosts, two_hosts, why_not
from test_backends import needs_horovod, needs_mpi
from test_multinode import long_fan_out, rank_processes, wait_until

from launcher.cli import job_token
from launcher.plan.planner import plan_launch
from launcher.plan.types import LaunchOptions, LaunchPlan
from launcher.supervise.procs import started

LONG = ["trainer.max_steps=1000000", "trainer.log_every=50", "trainer.eval_every=1000000",
        "trainer.checkpoint_every=1000000"]
SLOW = {"LAUNCHER_TEST_SLOW_STEP_S": "0.02"}  # slowed steps: the run is still mid-training when it is killed
WITHIN_S = 10.0


def argv(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def kill_launcher(launcher: int, token: str) -> float:
    """SIGKILL the launcher; assert that nothing carrying ``token`` is left within WITHIN_S; return how long it took."""
    before = token_processes(token)
    os.kill(launcher, signal.SIGKILL)
    killed = time.monotonic()
    left = leftover_token_processes(token, grace_s=WITHIN_S)
    took = time.monotonic() - killed
    print(f"everything of the run gone {took:.2f} s after the launcher's SIGKILL")
    assert left == [], f"still running {WITHIN_S} s after the launcher was killed: {left}\nbefore: " + \
        "\n".join(argv(p) for p in before)
    return took


# -- the token reaches every command (pure: no process) ----------------------------------------------------------
@pytest.mark.parametrize("names", [(), ("h1", "h2:3")])
@pytest.mark.parametrize("backend", ["torchrun", "horovod", "mpi"])
def test_every_command_carries_the_token(backend: str, names: tuple[str, ...]) -> None:
    def plan(token: str | None) -> LaunchPlan:
        return plan_launch(LaunchOptions(run_dir=Path("/runs/r"), backend=backend, gpus=2, hosts=names),
                           device_count=0, free_port=29999, cpu_count=4, python="/usr/bin/python3", env={},
                           job_token=token)

    for cmd in plan("tok").commands:
        assert cmd.env[TOKEN_VAR] == "tok"  # the runner (or ssh client) and all it starts locally
        if cmd.remote:  # the node agent and the ranks on the other end of ssh
            assert f"{TOKEN_VAR}=tok" in cmd.argv[-1].split()
        if backend == "mpi" and names:  # mpirun's ranks on other hosts
            assert f"{TOKEN_VAR}=tok" in cmd.argv
    assert all(TOKEN_VAR not in cmd.env for cmd in plan(None).commands)


def test_job_token_is_the_callers_or_fresh() -> None:
    assert job_token({TOKEN_VAR: "mine"}) == "mine"
    fresh = job_token({})
    assert len(fresh) == 32 and fresh != job_token({})
    # inherited from a rank of another run (a launcher started inside a job): not that run's, or its watchdog's
    assert job_token({TOKEN_VAR: "outer", "LAUNCHER_RUN_DIR": "/runs/outer"}) != "outer"


# -- SIGKILL of a real launcher --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchrun",
                                     pytest.param("horovod", marks=[pytest.mark.horovod, needs_horovod]),
                                     pytest.param("mpi", marks=[pytest.mark.mpi, needs_mpi])])
def test_sigkilled_launcher_leaves_no_process(tmp_path: Path, backend: str) -> None:
    token = uuid.uuid4().hex
    proc = start(tmp_path, "--backend", backend, *LONG, env={TOKEN_VAR: token, **SLOW})
    try:
        wait_for(lambda: len(rank_pids(tmp_path)) == 2 and (tmp_path / "tb").exists())  # both ranks training
        carriers = token_processes(token)
        assert proc.pid in carriers and set(rank_pids(tmp_path).values()) <= set(carriers)  # the ranks carry it
        kill_launcher(proc.pid, token)
    finally:
        proc.kill()  # a failed wait: SIGKILL, which this file shows to stop everything
        _, err = proc.communicate(timeout=30)  # the watchdog holds the launcher's stderr until it is done
    assert f"launcher: the launcher (pid {proc.pid}) is gone: stopped" in err, err[-2000:]


@pytest.mark.slow
def test_other_jobs_processes_survive(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
    bystanders = [
        subprocess.Popen(sleep, env={**os.environ, TOKEN_VAR: uuid.uuid4().hex}),  # another run's
        subprocess.Popen(sleep, env={**os.environ, TOKEN_VAR: token + "0"}),  # a token that merely starts alike
        subprocess.Popen([*sleep, token]),  # the token in its command line, not its environment
        subprocess.Popen(sleep, env={k: v for k, v in os.environ.items() if k != TOKEN_VAR}),  # none
    ]
    try:
        proc = start(tmp_path, *LONG, env={TOKEN_VAR: token, **SLOW})
        try:
            wait_for(lambda: len(rank_pids(tmp_path)) == 2 and (tmp_path / "tb").exists())
            kill_launcher(proc.pid, token)
        finally:
            proc.kill()
            proc.communicate(timeout=30)
        assert [b.poll() for b in bystanders] == [None] * len(bystanders)
    finally:
        for b in bystanders:
            b.kill()
            b.wait()


@pytest.mark.slow
def test_reaper_kills_what_ignores_sigterm_spares_the_older_and_stops_nothing_after_done() -> None:
    """The watchdog alone: SIGKILL after the grace for a process that ignores SIGTERM; a process that carries the
    token but is older than the launcher (the shell that exported it) is spared; ``done`` stops nothing."""
    token = uuid.uuid4().hex
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(600)"]
    env = {**os.environ, TOKEN_VAR: token}
    older = subprocess.Popen(stubborn, env=env, stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.1)  # some clock ticks
        for clean in (True, False):
            victim = subprocess.Popen(stubborn, env=env, stdout=subprocess.PIPE)  # started with the "launcher"
            assert victim.stdout is not None
            # SIGTERM must find it ignoring SIGTERM: before that line Python's own startup would die of it.
            assert victim.stdout.readline() == b"ready\n"
            since = started(victim.pid)
            assert since is not None and since > (started(older.pid) or since)
            reaper = subprocess.Popen([sys.executable, "-m", "launcher.supervise.reaper", token, str(since)], cwd=ROOT,
                                      stdin=subprocess.PIPE, stderr=subprocess.PIPE)
            assert reaper.stdin is not None
            if clean:
                reaper.stdin.write(b"done\n")
            reaper.stdin.close()
            assert reaper.wait(timeout=WITHIN_S) == 0
            if clean:
                assert victim.poll() is None
                victim.kill()
            assert victim.wait(timeout=WITHIN_S) == (-signal.SIGKILL)
            victim.stdout.close()
            assert token_processes(token) == [older.pid]
    finally:
        older.kill()
        older.wait()


def agent_argv(*command: str) -> list[str]:
    return [sys.executable, "-m", "launcher.supervise.node", "--", *command]


@pytest.mark.slow
def test_node_agent_ends_soon_after_its_input_ends() -> None:
    """The launcher gone (ssh's end of input): the agent stops its command well within 10 s, even one that
    ignores SIGTERM — not after the 30 s a Ctrl-C stop gets."""
    token = uuid.uuid4().hex
    agent = subprocess.Popen(agent_argv("sh", "-c", "trap '' TERM; sleep 600"), cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, env={**os.environ, TOKEN_VAR: token})
    wait_for(lambda: any(argv(p).startswith("sleep") for p in token_processes(token)), timeout=30)
    assert agent.stdin is not None
    agent.stdin.close()
    assert leftover_token_processes(token, grace_s=WITHIN_S) == []
    agent.wait(timeout=5)


@pytest.mark.slow
def test_node_agent_ends_when_its_parent_dies() -> None:
    """sshd's session process killed (its input stays open here): the parent-death signal stops the agent."""
    token = uuid.uuid4().hex
    parent = subprocess.Popen(  # a stand-in for sshd: starts the agent, shares its stdin with it, never exits
        [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(600)",
         *agent_argv("sleep", "600")], cwd=ROOT, stdin=subprocess.PIPE, env={**os.environ, TOKEN_VAR: token})
    try:
        wait_for(lambda: any(argv(p).startswith("sleep") for p in token_processes(token)), timeout=30)
        parent.kill()
        assert leftover_token_processes(token, grace_s=WITHIN_S) == []
    finally:
        parent.kill()
        parent.wait()


# -- over ssh: two network-namespace hosts (tests/netns_hosts.py), the fan-out from host 0 ------------------------
@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    reason = why_not()
    if reason:
        pytest.skip(f"cannot make two network-namespace hosts here: {reason}")
    with two_hosts(tmp_path_factory.mktemp("hosts"), subnet=3) as made:
        yield made


@pytest.mark.slow
@pytest.mark.multinode
def test_sigkilled_launcher_leaves_nothing_on_any_host(hosts: Hosts, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    token, run_dir = uuid.uuid4().hex, tmp_path / "run"
    monkeypatch.setenv(TOKEN_VAR, token)  # the launcher on host 0 gets the test's environment
    for key, value in SLOW.items():
        monkeypatch.setenv(key, value)
    proc = long_fan_out(hosts, tmp_path, 29631, *LONG[1:])
    try:
        wait_until(proc, lambda: len(rank_processes(hosts, 0, run_dir)) == 2 and
                   len(rank_processes(hosts, 1, run_dir)) == 2 and (run_dir / "tb").exists())
        carriers = token_processes(token)
        clients = [p for p in carriers if argv(p).startswith("ssh ")]
        agents = [p for p in carriers if "-m launcher.supervise.node" in argv(p) and p not in clients]
        assert len(agents) == 2 and len(clients) == 2, "\n".join(argv(p) for p in carriers)
        remote = set(rank_processes(hosts, 1, run_dir).values())
        assert remote <= set(carriers)  # the token reached the ranks on the other host through ssh
        # `ip netns exec` and the hostname wrapper exec: the launcher is the process started
        assert " -m launcher " in argv(proc.pid)
        kill_launcher(proc.pid, token)
        assert not set(hosts.pids(1)) & (remote | set(agents))
    finally:
        proc.kill()
        proc.communicate(timeout=30)
