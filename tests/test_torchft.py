"""``--fault-tolerant``: torchft's lighthouse and one torchrun per replica group, for real (issue #23).

A rank killed with SIGKILL: the other group keeps its process and keeps training, the killed group restarts
alone, heals from the live peer and rejoins; checkpoints and TensorBoard go on from whichever group leads the
quorum; the launcher killed leaves nothing behind and the job resumes from disk. Bad input is exit 2 with one
line and nothing started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TOKEN_VAR, finish, start, tb_scalars, token_processes, wait_for

from bench.goodput_suite import group_pids
from launcher.backends import torchft as ft_backend
from launcher.plan.planner import plan_launch
from launcher.plan.types import LaunchOptions
from workers.events import read as events

HAVE_TORCHFT = __import__("importlib").util.find_spec("torchft") is not None
needs_torchft = pytest.mark.skipif(not HAVE_TORCHFT, reason="torchft is not installed (bash scripts/setup.sh --test)")


def plan(**kw: object):  # noqa: ANN201
    opts = LaunchOptions(run_dir=Path("/runs/ft"), fault_tolerant=True, **kw)  # type: ignore[arg-type]
    return plan_launch(opts, device_count=0, free_port=29999, cpu_count=4, python="/venv/bin/python",
                       env={}, job_token="tok")


# -- the plan (no process started) ---------------------------------------------------------------------
def test_plan_is_a_lighthouse_and_one_torchrun_per_group_with_its_own_restarts() -> None:
    p = plan(gpus=3, lighthouse_port=29600)
    lighthouse, *groups = p.commands
    assert lighthouse.service and lighthouse.name == "lighthouse"
    assert lighthouse.argv[0].endswith("torchft_lighthouse") and "[::]:29600" in lighthouse.argv
    assert lighthouse.env[TOKEN_VAR] == "tok"  # the watchdog finds it should the launcher die
    assert [g.name for g in groups] == ["group0", "group1", "group2"]
    for i, g in enumerate(groups):
        assert not g.service
        assert g.argv[1:4] == ("-m", "torch.distributed.run", "--standalone")
        assert g.argv[g.argv.index("--nproc-per-node") + 1] == "1"
        assert g.argv[g.argv.index("--max-restarts") + 1] == "3"  # the default: a group comes back
        assert g.env["REPLICA_GROUP_ID"] == str(i) and g.env["NUM_REPLICA_GROUPS"] == "3"
        assert g.env["TORCHFT_LIGHTHOUSE"] == "http://127.0.0.1:29600"
        assert g.env["LAUNCHER_RUN_DIR"] == f"/runs/ft/groups/{i}"
    assert plan(gpus=2, max_restarts=5).commands[1].argv.count("5") >= 1


@pytest.mark.parametrize(("kw", "words"), [
    ({"backend": "mpi"}, "MPI has no mode"),
    ({"backend": "horovod", "controller": "mpi"}, "needs the gloo controller"),  # Horovod Elastic
])
def test_fault_tolerant_refuses_what_it_cannot_do(kw: dict, words: str) -> None:
    from launcher.errors import UsageError

    with pytest.raises(UsageError, match=words):
        plan(gpus=2, **kw)


def test_one_launcher_per_node_node_0_runs_the_lighthouse_and_groups_are_numbered_across_nodes() -> None:
    shape = {"gpus": 2, "nodes": 2, "master_addr": "n0", "lighthouse_port": 29600}
    head, other = plan(node_rank=0, **shape), plan(node_rank=1, **shape)
    assert [c.name for c in head.commands] == ["lighthouse", "group0", "group1"]
    assert [c.name for c in other.commands] == ["group2", "group3"]  # node 1 has no lighthouse of its own
    for g, cmd in enumerate([*head.commands[1:], *other.commands]):
        assert cmd.env["REPLICA_GROUP_ID"] == str(g) and cmd.env["NUM_REPLICA_GROUPS"] == "4"
        assert cmd.env["TORCHFT_LIGHTHOUSE"] == "http://n0:29600"  # node 0's, for every group


def test_hostfile_the_lighthouse_on_the_first_host_and_a_group_per_rank_over_ssh() -> None:
    import shlex

    from launcher.supervise.job import respawn

    p = plan_launch(LaunchOptions(run_dir=Path("/runs/ft"), fault_tolerant=True, hosts=("a:2@1,3", "b:2")),
                    device_count=4, free_port=29999, cpu_count=4, python="/venv/bin/python", env={}, job_token="t")
    lighthouse, *groups = p.commands
    assert lighthouse.service and lighthouse.remote and lighthouse.argv[0] == "ssh" and "a" in lighthouse.argv
    assert "torchft_lighthouse" in lighthouse.argv[-1]
    assert [(g.name, g.remote, g.argv[-2]) for g in groups] == [("group0", True, "a"), ("group1", True, "a"),
                                                                ("group2", True, "b"), ("group3", True, "b")]
    remote = [shlex.split(g.argv[-1]) for g in groups]
    gpus = [next(w for w in r if w.startswith("CUDA_VISIBLE_DEVICES=")).split("=")[1] for r in remote]
    assert gpus == ["1", "3", "0", "1"]  # gpus=1,3 on host a; b's slots in order
    assert not any(w.startswith("LAUNCHER_DEVICES=") for w in remote[1])  # the group's one GPU, set here
    assert all("TORCHFT_LIGHTHOUSE=http://a:29510" in r and "NUM_REPLICA_GROUPS=4" in r for r in remote)
    assert groups[2].env["LAUNCHER_RUN_DIR"] == "/runs/ft/groups/2" and groups[2].env["LAUNCHER_HOST"] == "b"
    again = respawn(p)
    assert again is not None and again.budget == 3
    rebuilt = again.build(3, 2)  # group 2 (command 3), its host lost after attempts 0 and 1
    assert rebuilt.argv[-2] == "b" and "LAUNCHER_ATTEMPT=2" in shlex.split(rebuilt.argv[-1])


def test_a_group_is_started_again_only_when_ssh_lost_its_host_and_within_its_budget() -> None:
    from launcher.supervise.respawn import Respawn

    r = Respawn(lambda i, a: None, budget=2, backoff_s=0)  # type: ignore[arg-type, return-value]
    assert r.lost(1, 1) is None and r.lost(1, 0) is None  # the group's own failure (its torchrun gave up), or done
    assert r.lost(1, 255) and r.lost(1, 255) is None  # scheduled once until started
    assert r.ready() == [1] and r.ready() == []
    assert r.lost(1, 255) and r.ready() == [1]
    assert r.lost(1, 255) is None  # 2 of 2 used


def test_missing_torchft_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    problem = ft_backend.check(plan(gpus=2))
    assert problem is not None and "pip install torchft" in problem


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("backend", [["mpi"], ["horovod", "--controller", "mpi"]])
def test_other_backends_are_exit_2_with_one_line_and_no_run_dir(tmp_path: Path, backend: list[str]) -> None:
    proc = run_cli("--gpus", "2", "--fault-tolerant", "--backend", *backend, "--run-dir", str(tmp_path / "r"),
                   cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "r").exists()


@needs_torchft
def test_lighthouse_port_in_use_is_exit_2_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("--gpus", "2", "--fault-tolerant", "--lighthouse-port", str(port),
                       "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and f"port {port} is in use" in proc.stderr, proc.stderr
    assert f"--lighthouse-port {port + 1}" in proc.stderr
    assert not (tmp_path / "r" / "plan.json").exists()


# -- real runs ------------------------------------------------------------------------------------------
def group_pid(run_dir: Path, group: int) -> int | None:
    """The live rank process of ``group`` (the trainer, not its torchrun)."""
    return group_pids(run_dir).get(group)



def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.json"))


FT_ARGS = ["--fault-tolerant", "trainer.max_steps=1200", "trainer.checkpoint_every=50", "trainer.log_every=25",
           "trainer.eval_every=100000"]
SLOW = {"LAUNCHER_TEST_SLOW_STEP_S": "0.02"}  # ~25 s of training: time to kill a rank mid-run


def start_ft(run_dir: Path, token: str, *extra: str) -> subprocess.Popen:
    return start(run_dir, *FT_ARGS, *extra, gpus=2, env={**SLOW, TOKEN_VAR: token})


def kill_group_midrun(run_dir: Path, group: int) -> tuple[int, int]:
    """SIGKILL ``group``'s rank once a checkpoint is on disk; returns (the other group's pid, the step then)."""
    wait_for(lambda: checkpoint_steps(run_dir) and group_pid(run_dir, 0) and group_pid(run_dir, 1), timeout=120)
    other = group_pid(run_dir, 1 - group)
    victim = group_pid(run_dir, group)
    assert other and victim
    step = checkpoint_steps(run_dir)[-1]
    os.kill(victim, signal.SIGKILL)
    return other, step


def kill_and_finish(run_dir: Path, group: int, *extra: str) -> tuple[int, int, str]:
    """Kill ``group``'s rank mid-run, wait for its heal while the other group keeps its process, let the run end
    (exit 0); returns (the checkpoint step at the kill, the step healed at, the launcher's stdout)."""
    proc = start_ft(run_dir, f"ft-kill-{group}", *extra)
    survivor, killed_at = kill_group_midrun(run_dir, group=group)
    wait_for(lambda: any(e["kind"] == "heal" for e in events(run_dir)), timeout=120)
    healed_at = next(e for e in events(run_dir) if e["kind"] == "heal")["step"]
    assert group_pid(run_dir, 1 - group) == survivor  # the healthy group never restarted
    code, out, err = finish(proc)
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    return killed_at, healed_at, out


@pytest.mark.slow
@needs_torchft
def test_killed_group_heals_while_the_other_never_stops(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed_at, _, out = kill_and_finish(run_dir, group=1)
    kinds = [(e["group"], e["kind"]) for e in events(run_dir)]
    assert (1, "restart") in kinds and (1, "heal") in kinds and (0, "drop") in kinds and (0, "rejoin") in kinds
    assert (0, "restart") not in kinds  # the healthy group: no restart, no checkpoint read
    heal = next(e for e in events(run_dir) if e["kind"] == "heal")
    assert heal["step"] > killed_at  # rejoined at the peers' current step, not the checkpoint's
    drop = next(e for e in events(run_dir) if e["kind"] == "drop")
    assert drop["group"] == 0 and drop["participants"] == 1 and "stall_s" in drop
    assert "fault tolerance: group 1 heal at step" in out
    result = json.loads((run_dir / "result.json").read_text())
    assert result["step"] == 1200 and result["test/accuracy"] >= 0.95
    tb = tb_scalars(run_dir)
    assert min(v for _, v in tb["ft/participants"]) == 1 and max(v for _, v in tb["ft/participants"]) == 2
    assert tb["ft/samples_skipped"][-1][1] > 0  # group 1's share of the steps it missed
    assert "sample(s) skipped" in out


@pytest.mark.slow
@needs_torchft
def test_group_0_killed_checkpoints_and_tensorboard_go_on_from_group_1(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # a restart 4 s after the kill (~200 steps): group 1 leads the quorum alone long enough to save and log
    killed_at, healed_at, out = kill_and_finish(run_dir, 0, "--restart-backoff", "4")
    # while group 0 was down, group 1 led the quorum: it wrote the checkpoints and TensorBoard of those steps
    saved_by_1 = [int(line.split("checkpoint step ")[1].split(":")[0]) for line in out.splitlines()
                  if line.startswith("[group1] ") and "checkpoint step " in line]  # (older files are purged)
    assert [s for s in saved_by_1 if killed_at < s < healed_at], (killed_at, healed_at, saved_by_1)
    logged = [s for s, _ in tb_scalars(run_dir)["train/loss"]]
    assert [s for s in logged if killed_at + 50 < s < healed_at], (killed_at, healed_at, logged)
    assert logged[-1] == 1200
    assert (0, "heal") in [(e["group"], e["kind"]) for e in events(run_dir)]


@pytest.mark.slow
@needs_torchft
def test_launcher_killed_leaves_nothing_and_the_job_resumes_from_disk(tmp_path: Path) -> None:
    run_dir, token = tmp_path / "run", "ft-launcher-kill"
    proc = start_ft(run_dir, token)
    wait_for(lambda: len(checkpoint_steps(run_dir)) >= 2, timeout=120)
    proc.kill()
    proc.wait()
    wait_for(lambda: not token_processes(token), timeout=60)  # the lighthouse and both groups, reaped
    saved = checkpoint_steps(run_dir)[-1]
    code, out, err = finish(start(run_dir, *FT_ARGS, gpus=2))
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    assert f"resuming from step {saved}" in out
    assert json.loads((run_dir / "result.json").read_text())["step"] == 1200


@pytest.mark.slow
@needs_torchft
def test_stopped_rank_is_dropped_then_its_stack_saved_and_its_group_restarted(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start(run_dir, *FT_ARGS, "--hang-timeout", "3", gpus=2, env={**SLOW, TOKEN_VAR: "ft-stop"})
    wait_for(lambda: checkpoint_steps(run_dir) and group_pid(run_dir, 0) and group_pid(run_dir, 1), timeout=120)
    survivor = group_pid(run_dir, 0)
    os.kill(group_pid(run_dir, 1), signal.SIGSTOP)  # type: ignore[arg-type]
    wait_for(lambda: any(e["kind"] == "heal" for e in events(run_dir)), timeout=120)
    assert group_pid(run_dir, 0) == survivor
    code, out, err = finish(proc)
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    kinds = [(e["group"], e["kind"]) for e in events(run_dir)]
    # dropped from the quorum by the lighthouse first (missed heartbeats), then found hung by the launcher
    assert kinds.index((0, "drop")) < kinds.index((1, "hang")) < kinds.index((1, "failure")) < kinds.index((1, "heal"))
    assert "launcher: group1 hung: rank 0" in err and "group1 restarts alone (attempt 1)" in err
    stacks = (run_dir / "groups" / "1" / "attempts" / "0" / "rank0.stacks").read_text()
    assert "most recent call first" in stacks  # faulthandler ran once the rank was continued
    assert json.loads((run_dir / "groups" / "1" / "attempts" / "0" / "failure.json").read_text())["reason"] == "hang"


@pytest.mark.slow
@needs_torchft
def test_a_users_own_torchft_program_runs_unmodified(tmp_path: Path) -> None:
    code, out, err = finish(start(tmp_path / "run", "--fault-tolerant", "--",
                                  str(ROOT / "examples" / "torchft" / "train_ft.py"), "--steps", "200", gpus=2))
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    for group in (0, 1):
        line = next(ln for ln in out.splitlines() if f"group {group} done" in ln)
        assert line.startswith(f"[group{group}] [rank0]:")
        weight, bias = float(line.split("y = ")[1].split(" x")[0]), float(line.rsplit("+ ", 1)[1])
        assert abs(weight - 3) < 0.1 and abs(bias + 1) < 0.1, line
    assert "group 1/2 step 200" in out and "participants 2" in out
