"""Two nodes for real: network namespaces with their own sshd (tests/netns_hosts.py), real torchrun/mpirun.

World size 4 = 2 "hosts" x 2 CPU ranks, compared with the same job as 4 ranks on one node.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, finish, leftover_processes, scalars
from netns_hosts import IFNAME, Hosts, two_hosts, why_not

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

SHORT = ["trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=1000", "trainer.checkpoint_every=1000"]
ENV = {"GLOO_SOCKET_IFNAME": IFNAME}  # gloo's device: the veth end, not the hostname's (unroutable) address


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    reason = why_not()
    if reason:
        pytest.skip(f"cannot make two network-namespace hosts here: {reason}")
    with two_hosts(tmp_path_factory.mktemp("hosts")) as made:
        yield made


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float]]:
    run_dir = tmp_path_factory.mktemp("one_node")
    code, out, err = finish(start_on(None, run_dir, "--gpus", "4", *SHORT))
    assert code == 0, out[-2000:] + err[-2000:]
    return scalars(run_dir, "train/loss")


def start_on(hosts: Hosts | None, run_dir: Path, *args: str, node: int = 0, cwd: Path = ROOT) -> subprocess.Popen:
    """``python -m launcher ARGS`` on host ``node`` (or plainly, without hosts)."""
    argv = [sys.executable, "-m", "launcher", "--run-dir", str(run_dir), *args]
    env = {**os.environ, **(ENV if hosts else {})}
    return subprocess.Popen(hosts.exec_argv(node, argv) if hosts else argv, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def hostfile(hosts: Hosts, path: Path, addrs: list[str] | None = None) -> Path:
    path.write_text("".join(f"{addr} slots=2\n" for addr in addrs or hosts.addrs))
    return path


def assert_same_losses(run_dir: Path, expected: list[tuple[int, float]]) -> None:
    got = scalars(run_dir, "train/loss")
    assert [s for s, _ in got] == [s for s, _ in expected] and len(got) == 30
    # the same gradients, summed in another order across the two "hosts"
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]),
                               rtol=1e-4, atol=0)


def test_per_node_mode_one_launcher_per_host(hosts: Hosts, tmp_path: Path, one_node_losses: list) -> None:
    run_dir = tmp_path / "run"
    shape = ["--nodes", "2", "--gpus", "2", "--master-addr", hosts.addrs[0], "--master-port", "29611"]
    procs = [start_on(hosts, run_dir, *shape, "--node-rank", str(i), *SHORT, node=i) for i in (1, 0)]
    for proc in procs:
        code, out, err = finish(proc)
        assert code == 0, out[-2000:] + err[-2000:]
    assert_same_losses(run_dir, one_node_losses)


def test_ssh_fan_out_trains_the_users_module_from_the_working_directory(hosts: Hosts, tmp_path: Path) -> None:
    """The user's model lives in the directory the launcher runs from (outside the repository): the ranks on
    both hosts import it from there."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "mynet.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n    def __init__(self, hidden: int) -> None:\n"
        "        super().__init__(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))\n")
    run_dir = tmp_path / "run"
    proc = start_on(hosts, run_dir, "--hostfile", str(hostfile(hosts, tmp_path / "hosts")), "--ssh-config",
                    str(hosts.ssh_config), "--master-port", "29613", *SHORT, "model._target_=mynet.Net",
                    "model.hidden=32", cwd=project)
    code, out, err = finish(proc)
    assert code == 0, out[-2000:] + err[-2000:]
    assert (run_dir / "result.json").exists() and "mynet.Net" in (run_dir / "config.yaml").read_text()


def test_ssh_fan_out_from_one_host(hosts: Hosts, tmp_path: Path, one_node_losses: list) -> None:
    run_dir = tmp_path / "run"
    proc = start_on(hosts, run_dir, "--hostfile", str(hostfile(hosts, tmp_path / "hosts")),
                    "--ssh-config", str(hosts.ssh_config), "--master-port", "29612", *SHORT)
    code, out, err = finish(proc)
    assert code == 0, out[-2000:] + err[-2000:]
    assert f"[{hosts.addrs[1]}] [rank" in out  # each node's rank-prefixed output, streamed back
    assert_same_losses(run_dir, one_node_losses)


def test_mpi_backend_across_hosts(hosts: Hosts, tmp_path: Path, one_node_losses: list) -> None:
    run_dir = tmp_path / "run"
    proc = start_on(hosts, run_dir, "--backend", "mpi", "--hostfile", str(hostfile(hosts, tmp_path / "hosts")),
                    "--ssh-config", str(hosts.ssh_config), *SHORT)
    code, out, err = finish(proc)
    assert code == 0, out[-2000:] + err[-2000:]
    assert hosts.hostnames[0] in out and hosts.hostnames[1] in out  # rank 0's topology table: both hosts
    assert_same_losses(run_dir, one_node_losses)


def rank_processes(hosts: Hosts, node: int, run_dir: Path) -> dict[int, int]:
    """{global rank: pid} of the training processes running on host ``node``."""
    ranks = {}
    for pid in hosts.pids(node):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            environ = dict(e.split(b"=", 1) for e in raw if b"=" in e)
        except OSError:
            continue
        if b"workers.train" in argv and b"torch.distributed.run" not in argv \
                and b"launcher.supervise.node" not in argv \
                and str(run_dir).encode() in argv and b"RANK" in environ:
            ranks[int(environ[b"RANK"])] = pid
    return ranks


def long_fan_out(hosts: Hosts, tmp_path: Path, port: int, *args: str) -> subprocess.Popen:
    """A fan-out job from host 0 that would run for a long time, into tmp_path/run."""
    return start_on(hosts, tmp_path / "run", "--hostfile", str(hostfile(hosts, tmp_path / "hosts")),
                    "--ssh-config", str(hosts.ssh_config), "--master-port", str(port), "trainer.max_steps=100000",
                    *args)


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)
        time.sleep(0.2)


def test_killed_remote_rank_stops_every_node(hosts: Hosts, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = long_fan_out(hosts, tmp_path, 29613, "trainer.checkpoint_every=20")
    wait_until(proc, lambda: bool(list((run_dir / "checkpoints").glob("step-*.pt"))))  # training on both hosts
    remote = rank_processes(hosts, 1, run_dir)
    assert len(remote) == 2 and len(rank_processes(hosts, 0, run_dir)) == 2
    victim = max(remote)
    os.kill(remote[victim], signal.SIGKILL)
    code, out, err = finish(proc, timeout=120)
    assert code != 0
    assert f"launcher: rank {victim} on {hosts.addrs[1]} failed (killed by signal SIGKILL)" in err, err[-3000:]
    assert leftover_processes(run_dir) == []  # no rank, torchrun or node agent on either host
    assert rank_processes(hosts, 0, run_dir) == {} and rank_processes(hosts, 1, run_dir) == {}


def test_unreachable_host_exits_2_before_starting_anything(hosts: Hosts, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    dead = hosts.addrs[1].rsplit(".", 1)[0] + ".77"  # in the subnet, but nobody answers there
    started = time.monotonic()
    proc = start_on(hosts, run_dir, "--hostfile", str(hostfile(hosts, tmp_path / "hosts", [hosts.addrs[0], dead])),
                    "--ssh-config", str(hosts.ssh_config), "--ssh-timeout", "3", *SHORT)
    code, out, err = finish(proc, timeout=60)
    assert code == 2, out + err
    assert err.count("\n") == 1 and f"host {dead} is unreachable over ssh" in err and "HINT" in err, err
    assert time.monotonic() - started < 30  # the connect timeout, plus interpreter starts
    assert out == "" and not run_dir.exists()
    assert leftover_processes(run_dir) == []


def test_ctrl_c_stops_every_node_with_a_checkpoint(hosts: Hosts, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = long_fan_out(hosts, tmp_path, 29614, "trainer.checkpoint_every=1000000")
    wait_until(proc, lambda: len(rank_processes(hosts, 1, run_dir)) == 2 and (run_dir / "tb").exists())
    time.sleep(3)  # training under way
    proc.send_signal(signal.SIGINT)  # Ctrl-C on node 1: the remote ranks must checkpoint and stop too
    code, out, err = finish(proc, timeout=120)
    assert code == 130, out[-2000:] + err[-2000:]
    stopped = int(out.split("stopping on request at step ")[1].split(":")[0])
    assert (run_dir / "checkpoints" / f"step-{stopped:08d}.pt").exists()
    assert leftover_processes(run_dir) == []


def test_elastic_job_goes_on_without_a_node_that_died(hosts: Hosts, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--nodes 1:2: host 1 dies (every process of the run on it, SIGKILL) after a checkpoint; host 0 goes on
    from that checkpoint at half the world size, to the end, and no sample of an epoch is trained twice."""
    run_dir, logs, steps = tmp_path / "run", tmp_path / "samples", 40
    logs.mkdir()
    monkeypatch.setenv("LAUNCHER_TEST_SLOW_STEP_S", "0.2")  # forwarded to both hosts (LAUNCHER_*)
    monkeypatch.setenv("LAUNCHER_TEST_SAMPLE_LOG", str(logs))
    proc = start_on(hosts, run_dir, "--hostfile", str(hostfile(hosts, tmp_path / "hosts")), "--ssh-config",
                    str(hosts.ssh_config), "--master-port", "29614", "--nodes", "1:2", "--restart-backoff", "0",
                    f"trainer.max_steps={steps}", "trainer.checkpoint_every=5", "trainer.eval_every=1000")
    wait_until(proc, lambda: (run_dir / "checkpoints" / "step-00000010.json").exists())
    assert len(rank_processes(hosts, 1, run_dir)) == 2
    for pid in hosts.pids(1):  # the host dies: its node agent, torchrun and ranks
        with contextlib.suppress(OSError):
            if str(run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    code, out, err = finish(proc, timeout=240)
    assert code == 0, out[-3000:] + err[-3000:]
    assert f"node {hosts.addrs[1]} left the job" in err
    resumed = int(re.findall(r"resuming from step (\d+)", out)[-1])
    assert resumed >= 10 and json.loads((run_dir / "result.json").read_text())["step"] == steps
    last = max(int(p.name) for p in (run_dir / "attempts").iterdir())
    worlds = {json.loads(p.read_text())["world_size"] for p in (run_dir / "attempts" / str(last)).glob("*.progress")}
    assert worlds == {2}  # host 0's two ranks alone
    # each rank's sample log: one line per step it began; the steps after the checkpoint it resumed from
    # were rolled back, so drop them — then no (epoch, sample) may repeat
    seen = []
    for path in logs.glob("rank*.txt"):
        lines = path.read_text().splitlines()
        rank = int(path.stem[4:])
        began = len(lines) - (steps - resumed if rank < 2 else 0)  # ranks 0, 1 trained on after the restart
        kept = lines[:resumed] + (lines[began:] if rank < 2 else [])
        for line in kept:
            epoch, *idx = map(int, line.split())
            seen += [(epoch, i) for i in idx]
    assert len(seen) == len(set(seen)), "a sample was trained twice in an epoch"
    assert leftover_processes(run_dir) == []


@pytest.mark.horovod
def test_horovod_elastic_host_dies_the_other_goes_on_and_it_is_added_back(hosts: Hosts, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--backend horovod --fault-tolerant over two hosts of one slot: host 1 dies (every process of the run on it,
    SIGKILL); host 0's worker keeps its process and trains on at size 1; discovery still lists host 1, so after
    Horovod's blacklist cooldown horovodrun starts a worker there again over ssh, and it is added back."""
    from bench.goodput_suite import elastic_workers
    from workers.events import read as events

    def workers(node: int) -> list[int]:
        return sorted(set(hosts.pids(node)) & set(elastic_workers(run_dir)))

    run_dir = tmp_path / "run"
    monkeypatch.setenv("LAUNCHER_TEST_SLOW_STEP_S", "0.05")  # forwarded to both hosts (horovodrun exports its env)
    (tmp_path / "hosts").write_text(f"{hosts.addrs[0]} slots=1\n{hosts.addrs[1]} slots=1\n")
    proc = start_on(hosts, run_dir, "--backend", "horovod", "--fault-tolerant", "--hostfile", str(tmp_path / "hosts"),
                    "--ssh-config", str(hosts.ssh_config), "trainer.max_steps=500", "trainer.log_every=10",
                    "trainer.eval_every=100000", "trainer.checkpoint_every=50")
    wait_until(proc, lambda: len(workers(0)) == len(workers(1)) == 1
               and (run_dir / "checkpoints" / "step-00000050.json").exists())
    (survivor,), (victim,) = workers(0), workers(1)
    for pid in hosts.pids(1):  # the host dies: the worker and the shell horovodrun's ssh started it in
        with contextlib.suppress(OSError):
            if str(run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    wait_until(proc, lambda: any(e["kind"] == "resumed" and e["size"] == 1 for e in events(run_dir)))
    wait_until(proc, lambda: any(e["kind"] == "resumed" and e["size"] == 2 for e in events(run_dir)))
    assert workers(0) == [survivor] and len(workers(1)) == 1 and workers(1) != [victim]  # a new worker on host 1
    code, out, err = finish(proc, timeout=240)
    assert code == 0, out[-3000:] + err[-3000:]
    records = events(run_dir)
    alone = next(e for e in records if e["kind"] == "resumed" and e["size"] == 1)
    assert alone["host"] == hosts.hostnames[0]  # host 0's worker stepped on alone (it was rank 0 then)
    slots = [(e["kind"], e["slot"]) for e in records if e["kind"] in ("failure", "rejoin")]
    assert slots == [("failure", hosts.addrs[1]), ("rejoin", hosts.addrs[1])], slots
    assert json.loads((run_dir / "result.json").read_text())["step"] == 500
    assert leftover_processes(run_dir) == [] and workers(0) == workers(1) == []


SHOW_DEVICES = """
import json, os, socket
print("DEVICES " + json.dumps({"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
                               "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}), flush=True)
"""


@pytest.mark.parametrize("backend", ["torchrun", pytest.param("mpi", marks=pytest.mark.mpi),
                                     pytest.param("horovod", marks=pytest.mark.horovod)])
def test_hosts_with_other_slot_counts_and_pinned_gpus(hosts: Hosts, tmp_path: Path, backend: str) -> None:
    """'host slots=N gpus=…' lines: 1 rank on host 0 pinned to GPU 3, 2 on host 1 pinned to GPUs 0 and 2 — each
    rank sees its host's CUDA_VISIBLE_DEVICES (set by workers/rank.py before CUDA starts), on every backend."""
    script = tmp_path / "show.py"
    script.write_text(SHOW_DEVICES)
    lines = f"{hosts.addrs[0]} slots=1 gpus=3\n{hosts.addrs[1]} slots=2 gpus=0,2\n"
    (tmp_path / "hosts").write_text(lines)
    proc = start_on(hosts, tmp_path / "run", "--backend", backend, "--hostfile", str(tmp_path / "hosts"),
                    "--ssh-config", str(hosts.ssh_config), "--master-port", "29615", "--", str(script), cwd=tmp_path)
    code, out, err = finish(proc)
    assert code == 0, out[-2000:] + err[-2000:]
    seen = {r["rank"]: r for r in map(json.loads, re.findall(r"DEVICES (\{[^}]*\})", out))}
    assert sorted(seen) == [0, 1, 2] and {r["world"] for r in seen.values()} == {3}
    assert sorted(r["visible"] for r in seen.values()) == ["0,2", "0,2", "3"]


def kill_host(hosts: Hosts, node: int, run_dir: Path) -> None:
    """Every process of the run on host ``node`` dies (node agents, torchruns, ranks)."""
    for pid in hosts.pids(node):
        with contextlib.suppress(OSError):
            if str(run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@pytest.mark.torchft
@pytest.mark.skipif(__import__("importlib").util.find_spec("torchft") is None, reason="torchft is not installed")
def test_fault_tolerant_host_dies_the_other_goes_on_and_it_joins_when_back(hosts: Hosts, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--fault-tolerant over a hostfile (torchft, a replica group per rank): host 1 dies and is unreachable for a
    few seconds; the rank on host 0 keeps its process and keeps training; once host 1 answers again the launcher
    starts its group there again, it heals from host 0's live state and rejoins. Then that rank hangs (SIGSTOP): the
    launcher's watch of its group has its stack saved and kills it through host 1's node agent, and its torchrun
    restarts it. The run ends rc 0."""
    from workers.events import read as events

    run_dir = tmp_path / "run"
    monkeypatch.setenv("LAUNCHER_TEST_SLOW_STEP_S", "0.02")
    hostlist = tmp_path / "hosts"
    hostlist.write_text("".join(f"{addr} slots=1\n" for addr in hosts.addrs))
    proc = start_on(hosts, run_dir, "--hostfile", str(hostlist), "--ssh-config", str(hosts.ssh_config),
                    "--ssh-timeout", "2", "--restart-backoff", "1", "--max-restarts", "5", "--fault-tolerant",
                    "--lighthouse-port", "29621", "--hang-timeout", "3", "trainer.max_steps=2500",
                    "trainer.log_every=25", "trainer.checkpoint_every=100", "trainer.eval_every=100000")
    wait_until(proc, lambda: (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").glob("*.json"))
               and len(rank_processes(hosts, 1, run_dir)) == 1)
    survivor = rank_processes(hosts, 0, run_dir)
    assert list(survivor) == [0]
    kill_host(hosts, 1, run_dir)
    subprocess.run(["ip", "-n", hosts.namespaces[1], "link", "set", IFNAME, "down"], check=True)  # and it is gone
    time.sleep(4)
    assert rank_processes(hosts, 0, run_dir) == survivor  # host 0 trains on alone
    subprocess.run(["ip", "-n", hosts.namespaces[1], "link", "set", IFNAME, "up"], check=True)  # back
    wait_until(proc, lambda: any(e["kind"] == "heal" for e in events(run_dir)), timeout=180)
    assert rank_processes(hosts, 0, run_dir) == survivor  # never restarted, never read a checkpoint
    os.kill(next(iter(rank_processes(hosts, 1, run_dir).values())), signal.SIGSTOP)
    wait_until(proc, lambda: sum(e["kind"] == "heal" for e in events(run_dir)) == 2, timeout=180)
    assert rank_processes(hosts, 0, run_dir) == survivor
    code, out, err = finish(proc, timeout=300)
    assert code == 0, out[-3000:] + err[-3000:]
    assert f"group1 lost its host {hosts.addrs[1]}" in err, err[-3000:]
    kinds = [e["kind"] for e in events(run_dir)]
    assert "failure" in kinds and "drop" in kinds and "rejoin" in kinds and "hang" in kinds, kinds
    stacks = list((run_dir / "groups" / "1" / "attempts").glob("*/rank0.stacks"))
    # the hung attempt's, written on host 1 once its node agent passed on the launcher's SIGUSR2 and SIGCONT
    assert any("most recent call first" in path.read_text() for path in stacks), stacks
    assert json.loads((run_dir / "result.json").read_text())["step"] == 2500
    assert leftover_processes(run_dir) == []
    assert leftover_processes("[::]:29621") == []  # the lighthouse on host 0 went with the run
