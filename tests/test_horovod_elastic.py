"""``--backend horovod --fault-tolerant``: Horovod Elastic, for real (issue #24).

horovodrun in elastic mode with the launcher's host discovery script; the built-in trainer under
``hvd.elastic.run``. A worker killed with SIGKILL: the other keeps its process and keeps stepping, the ring
re-forms at size 1, the killed slot is started again and added back; the run ends with the digits accuracy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
from pathlib import Path

import pytest
from conftest import ROOT, TOKEN_VAR, finish, launch, run_processes, start, tb_scalars, token_processes, wait_for

from bench.goodput_suite import elastic_pids, elastic_workers
from launcher.errors import UsageError
from launcher.plan.planner import plan_launch
from launcher.plan.types import LaunchOptions
from workers.events import read as events

has_horovod = shutil.which("horovodrun") is not None and importlib.util.find_spec("horovod") is not None
needs_horovod = pytest.mark.skipif(not has_horovod, reason="needs horovod: bash scripts/install_horovod.sh")


def plan(**kw: object):  # noqa: ANN201
    opts = LaunchOptions(run_dir=Path("/runs/el"), backend="horovod", fault_tolerant=True, **kw)  # type: ignore[arg-type]
    return plan_launch(opts, device_count=0, free_port=29999, cpu_count=4, python="/venv/bin/python",
                       env={}, job_token="tok")


# -- the plan (no process started) ---------------------------------------------------------------------
def test_plan_is_horovodrun_elastic_with_the_launchers_discovery_script() -> None:
    (cmd,) = plan(gpus=3).commands
    argv = list(cmd.argv)
    assert argv[argv.index("-np") + 1] == "3"
    assert argv[argv.index("--min-np") + 1] == "1" and argv[argv.index("--max-np") + 1] == "3"
    assert argv[argv.index("--host-discovery-script") + 1] == "/runs/el/discover_hosts.sh"
    assert "--gloo" in argv and "-H" not in argv  # the hosts come from discovery
    assert plan(gpus=3).max_restarts == 3  # the whole job restarts from disk if horovodrun itself fails


def test_discovery_script_prints_the_hosts(tmp_path: Path) -> None:
    import subprocess

    from launcher.backends.horovodrun import HorovodBackend

    p = plan_launch(LaunchOptions(run_dir=tmp_path, backend="horovod", fault_tolerant=True, gpus=2),
                    device_count=0, free_port=29999, cpu_count=4, python="/venv/bin/python", env={}, job_token="t")
    HorovodBackend.write_discovery(p)
    out = subprocess.run([str(tmp_path / "discover_hosts.sh")], capture_output=True, text=True, check=True).stdout
    assert out == "localhost:1\n127.0.0.1:1\n"  # a host of its own per rank: Horovod drops a failed worker's host


def test_more_ranks_than_local_names_is_refused() -> None:
    from launcher.backends.horovodrun import check_elastic, local_names

    assert check_elastic(plan(gpus=2)) is None
    problem = check_elastic(plan(gpus=len(local_names()) + 1))
    assert problem is not None and "HINT: --gpus" in problem and "torchft" in problem


@pytest.mark.parametrize(("kw", "words"), [
    ({"controller": "mpi"}, "needs the gloo controller"),
    ({"nodes": 2, "node_rank": 0, "master_addr": "n0"}, "one horovodrun for every host"),
])
def test_elastic_refuses_what_it_cannot_do(kw: dict, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        plan(gpus=2, **kw)


def test_elastic_across_hosts_lists_them_and_probes_their_interfaces(tmp_path: Path) -> None:
    import subprocess

    from launcher.backends.horovodrun import HorovodBackend, check_elastic

    p = plan_launch(LaunchOptions(run_dir=tmp_path, backend="horovod", fault_tolerant=True,
                                  hosts=("10.9.0.1:2", "10.9.0.2:2")),
                    device_count=0, free_port=29999, cpu_count=4, python="/venv/bin/python", env={}, job_token="t")
    argv = list(p.commands[0].argv)
    # no loopback: horovodrun finds the interfaces the hosts share (over ssh, at the start)
    assert argv[argv.index("-np") + 1] == "4" and "--network-interface" not in argv and check_elastic(p) is None
    HorovodBackend.write_discovery(p)
    out = subprocess.run([str(tmp_path / "discover_hosts.sh")], capture_output=True, text=True, check=True).stdout
    assert out == "10.9.0.1:2\n10.9.0.2:2\n"
    argv = list(plan(hosts=("a", "b"), network_interface="eth1").commands[0].argv)
    assert argv.count("--network-interface") == 1 and argv[argv.index("--network-interface") + 1] == "eth1"
    problem = check_elastic(plan(hosts=("node1:2",)))
    assert problem is not None and "one host" in problem and "HINT" in problem


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the ssh client")
def test_horovodruns_ssh_reaches_hosts_as_the_launchers_does(tmp_path: Path) -> None:
    """horovodrun's bare ``ssh`` is the launcher's wrapper: --ssh-config and BatchMode apply (``ssh -G``: the options
    it would connect with; it connects nowhere)."""
    import subprocess

    from launcher.backends.horovodrun import HorovodBackend

    config = tmp_path / "ssh_config"
    config.write_text("Host 10.9.*\n  User someone\n  Port 2222\n")
    p = plan_launch(LaunchOptions(run_dir=tmp_path, backend="horovod", hosts=("10.9.0.1", "10.9.0.2"),
                                  ssh_config=config),
                    device_count=0, free_port=29999, cpu_count=4, python="/venv/bin/python", env={}, job_token="t")
    HorovodBackend.write_ssh(p)
    prefix = list(p.commands[0].argv[:p.commands[0].argv.index("horovodrun")])
    found = subprocess.run([*prefix, "sh", "-c", "command -v ssh"], capture_output=True, text=True).stdout.strip()
    assert found == str(tmp_path / "horovod_ssh" / "ssh")
    # as horovod/runner/util/remote.py calls it
    out = subprocess.run([found, "-o", "PasswordAuthentication=no", "-o", "StrictHostKeyChecking=no", "-G",
                          "10.9.0.2"], capture_output=True, text=True, check=True).stdout.splitlines()
    assert {"user someone", "port 2222", "batchmode yes", "connecttimeout 10"} <= set(out)


@needs_horovod
def test_a_workers_gpu_skips_only_this_machines_earlier_hosts() -> None:
    from workers.distributed.elastic import local_slots_before

    # one node: each rank a host of one slot under another name of this machine -> its line
    assert local_slots_before({"localhost": 1, "127.0.0.1": 1}, "127.0.0.1") == 1
    assert local_slots_before({"localhost": 1, "127.0.0.1": 1}, "localhost") == 0
    # other machines take no GPU of this one: the GPU is Horovod's local rank
    assert local_slots_before({"10.231.99.1": 2, "127.0.0.1": 2}, "127.0.0.1") == 0


# -- real horovodrun -----------------------------------------------------------------------------------
def kill_and_finish(run_dir: Path, victim: int) -> tuple[int, str, str, int]:
    """Start a slowed 2-worker elastic run, SIGKILL the worker that started as rank ``victim`` once training is
    under way, check that the other keeps its process through the reset; returns (code, out, err, survivor pid)."""
    proc = start(run_dir, "--backend", "horovod", "--fault-tolerant", "trainer.max_steps=600", "trainer.log_every=10",
                 "trainer.eval_every=1000", "trainer.checkpoint_every=50", env={"LAUNCHER_TEST_SLOW_STEP_S": "0.03"})
    try:
        wait_for(lambda: len(elastic_workers(run_dir)) == 2
                 and (run_dir / "checkpoints" / "step-00000050.json").exists())
        pids = elastic_pids(run_dir)
        survivor = pids[1 - victim]
        os.kill(pids[victim], signal.SIGKILL)
        wait_for(lambda: any(e["kind"] == "resumed" and e["size"] == 1 for e in events(run_dir)))
        wait_for(lambda: any(e["kind"] == "resumed" and e["size"] == 2 for e in events(run_dir)))  # it rejoined
        assert survivor in elastic_workers(run_dir)  # the survivor never restarted
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, out, err, survivor


def test_a_departed_workers_failure_record_is_in_its_own_folder(tmp_path: Path) -> None:
    from workers import contract, incarnation

    (tmp_path / "elastic_hosts.txt").write_text("localhost:1\nnode2:2\n")
    killed, raised = (contract.incarnation_dir(contract.attempt_dir(tmp_path, 0), s, 0) for s in (1, 2))
    for own, slot in ((killed, 1), (raised, 2)):
        own.mkdir(parents=True)
        contract.rank_file(own, slot, contract.PROGRESS).write_text(json.dumps({"pid": 40 + slot, "step": 7,
                                                                                 "phase": "step"}))
    raised_exit = {"exit_code": 1, "signal": None, "at": 5.0, "log": "L"}  # an exception's exit record
    contract.rank_file(raised, 2, contract.EXIT).write_text(json.dumps(raised_exit))
    assert incarnation.record_departure(tmp_path, 0, "node2", 9) == [contract.failure_file(killed),
                                                                   contract.failure_file(raised)]
    first, second = (json.loads(contract.failure_file(d).read_text()) for d in (killed, raised))
    assert (first["reason"], first["signal"], first["pid"], first["step"]) == ("signal", "SIGKILL", 41, 7)
    assert "no exit record" in first["note"]
    assert (second["reason"], second["exit_code"], second["log"]) == ("exit", 1, "L")
    assert incarnation.record_departure(tmp_path, 0, "node2", 9) == []  # written once
    assert incarnation.record_departure(tmp_path, 0, "gone", 9) == []


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_killed_worker_the_other_goes_on_and_it_rejoins(tmp_path: Path) -> None:
    code, out, err, survivor = kill_and_finish(tmp_path, victim=1)
    assert code == 0, err[-3000:]
    assert json.loads((tmp_path / "result.json").read_text())["test/accuracy"] >= 0.95
    kinds = [(e["kind"], e["size"]) for e in events(tmp_path) if e["kind"] in ("reset", "resumed")]
    assert kinds[:2] == [("reset", 1), ("resumed", 1)] and ("reset", 2) in kinds, kinds
    reset = next(e for e in events(tmp_path) if e["kind"] == "reset")
    every = int(re.search(r"elastic_commit_every: (\d+)", (ROOT / "configs/trainer/default.yaml").read_text())[1])
    assert 0 <= reset["redo"] < every  # rolled back to the last commit (trainer.elastic_commit_every)
    assert "horovod elastic: reset at step" in out
    slots = [(e["kind"], e["slot"]) for e in events(tmp_path) if e["kind"] in ("failure", "rejoin")]
    assert len(slots) == 2 and slots[0][0] == "failure" and slots[1] == ("rejoin", slots[0][1]), slots
    [record] = next(e for e in events(tmp_path) if e["kind"] == "failure")["records"]  # the killed worker's
    failed = json.loads(Path(record).read_text())  # in its own folder, slot<S>/0 (start rank 1 may be on either slot)
    assert record.endswith("/0/failure.json") and failed["signal"] == "SIGKILL" and failed["pid"] != survivor
    steps = [s for s, _ in tb_scalars(tmp_path)["train/loss"]]
    assert steps[-1] == 600
    assert not run_processes(tmp_path)


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_a_slot_past_its_max_restarts_is_not_started_again_and_the_other_goes_on(tmp_path: Path) -> None:
    """--max-restarts counts per slot: the killed slot comes back once; killed again, it stays out."""
    proc = start(tmp_path, "--backend", "horovod", "--fault-tolerant", "--max-restarts", "1", "trainer.max_steps=500",
                 "trainer.log_every=10", "trainer.eval_every=1000", "trainer.checkpoint_every=50",
                 env={"LAUNCHER_TEST_SLOW_STEP_S": "0.03"})
    try:
        wait_for(lambda: len(elastic_workers(tmp_path)) == 2
                 and (tmp_path / "checkpoints" / "step-00000050.json").exists())
        pids = elastic_pids(tmp_path)
        survivor, victim = pids[0], pids[1]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(elastic_workers(tmp_path)) == 2 and victim not in elastic_workers(tmp_path))
        wait_for(lambda: any(e["kind"] == "rejoin" for e in events(tmp_path)))  # in the world again, training
        (again,) = set(elastic_workers(tmp_path)) - {survivor}
        os.kill(again, signal.SIGKILL)
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    failures = [e for e in events(tmp_path) if e["kind"] == "failure"]
    assert [e["failures"] for e in failures] == [1, 2] and failures[0]["slot"] == failures[1]["slot"], failures
    assert "more than --max-restarts 1: not started again" in out
    slot = failures[0]["slot"]
    import subprocess

    discovered = subprocess.run([str(tmp_path / "discover_hosts.sh")], capture_output=True, text=True,
                                check=True).stdout.split()
    names = [line.rsplit(":", 1)[0] for line in discovered]
    assert len(names) == 1 and slot not in names  # out of discovery's listing
    assert len((tmp_path / "elastic_hosts.txt").read_text().split()) == 2  # the hosts file is kept: GPUs by line
    assert [e["kind"] for e in events(tmp_path)].count("rejoin") == 1  # it came back once only
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 500  # the survivor finished alone
    assert not run_processes(tmp_path)


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_killed_rank_0_the_survivor_becomes_rank_0_and_checkpoints_go_on(tmp_path: Path) -> None:
    code, out, err, survivor = kill_and_finish(tmp_path, victim=0)
    assert code == 0, err[-3000:]
    killed_at = next(e["step"] for e in events(tmp_path) if e["kind"] == "reset")
    saved = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*.json"))
    assert saved[-1] == 600 and any(killed_at < s < 600 for s in saved), saved
    assert not run_processes(tmp_path)


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_launcher_killed_leaves_nothing_and_the_job_resumes_from_disk(tmp_path: Path) -> None:
    args = ["--backend", "horovod", "--fault-tolerant", "trainer.max_steps=300", "trainer.log_every=10",
            "trainer.eval_every=1000", "trainer.checkpoint_every=50"]
    token = "elastic-launcher-kill"
    proc = start(tmp_path, *args, env={"LAUNCHER_TEST_SLOW_STEP_S": "0.03", TOKEN_VAR: token})
    wait_for(lambda: (tmp_path / "checkpoints" / "step-00000100.json").exists())
    proc.kill()
    proc.wait()
    wait_for(lambda: not token_processes(token), timeout=60)  # horovodrun and its workers, reaped
    saved = max(int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*.json"))
    code, out, err = finish(start(tmp_path, *args))
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    assert f"resuming from step {saved}" in out
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 300


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_a_finished_run_started_again_evaluates_and_ends(tmp_path: Path) -> None:
    """A restart from disk at trainer.max_steps (the launcher's restart of horovodrun that failed at the very end)
    ends as a plain run does. Only rank 0 finds the checkpoint (nothing is collective before the loop), so the
    ranks once disagreed on whether the last step was saved, and waited for ever in different collectives."""
    args = ["--backend", "horovod", "--fault-tolerant", "trainer.max_steps=20", "trainer.log_every=10",
            "trainer.eval_every=1000", "trainer.checkpoint_every=10"]
    launch(tmp_path, *args)
    code, out, err = finish(start(tmp_path, *args), timeout=180)
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    assert "resuming from step 20" in out and "step 20: test accuracy" in out
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 20


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_users_own_elastic_script_runs_unmodified_and_survives_a_kill(tmp_path: Path) -> None:
    script = str(ROOT / "examples" / "horovod_elastic" / "train_elastic.py")
    proc = start(tmp_path, "--backend", "horovod", "--fault-tolerant", "--", script, "--steps", "400",
                 "--sleep", "0.03")
    try:
        # both in the loop (a worker killed in hvd.init, before hvd.elastic.run, takes its peer's start-up with it):
        # the script prints its step 50 into horovodrun's file per rank
        outputs = [tmp_path / "logs" / "horovod" / "attempt_0" / f"rank.{r}" / "stdout" for r in (0, 1)]
        wait_for(lambda: all(o.exists() and " step 50 " in o.read_text() for o in outputs))
        pids = elastic_pids(tmp_path)
        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: len(elastic_workers(tmp_path)) == 2 and pids[1] not in
                 elastic_workers(tmp_path))  # its slot started again
        assert pids[0] in elastic_workers(tmp_path)
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    assert "reset: rank 0 of 1" in out and "reset: rank 0 of 2" in out  # went on alone, then the slot rejoined
    assert "rank 0: done at step 400: w 3.000 b -1.000" in out


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_stopped_worker_is_killed_alone_its_stack_and_records_kept_and_it_rejoins(tmp_path: Path) -> None:
    """A SIGSTOPped worker holds the other in the next collective: past --hang-timeout the launcher saves its stack,
    records the hang and kills it alone; the other keeps its process and steps on, the slot's worker comes back, and
    the first worker's records on that slot are still there beside the second's."""
    proc = start(tmp_path, "--backend", "horovod", "--fault-tolerant", "--hang-timeout", "8", "trainer.max_steps=600",
                 "trainer.log_every=10", "trainer.eval_every=1000", "trainer.checkpoint_every=50",
                 env={"LAUNCHER_TEST_SLOW_STEP_S": "0.03"})
    attempt = tmp_path / "attempts" / "0"

    def record(slot: int) -> dict:
        return json.loads((attempt / f"rank{slot}.progress").read_text())

    victim = 0
    try:
        # both past the checkpoint at step 50 (its barrier is in phase checkpoint, whose timeout is the checkpoint
        # one) and training: the survivor will wait for the stopped one in a step's all-reduce
        wait_for(lambda: len(elastic_workers(tmp_path)) == 2
                 and (tmp_path / "checkpoints" / "step-00000050.json").exists()
                 and all(record(s)["phase"] == "step" and record(s)["step"] > 52 for s in (0, 1)))
        survivor, victim = record(0)["pid"], record(1)["pid"]
        assert set(elastic_workers(tmp_path)) == {survivor, victim}
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: any(e["kind"] == "hang" for e in events(tmp_path)))
        hang_at = len(events(tmp_path))
        wait_for(lambda: any(e["kind"] == "resumed" and e["size"] == 1 for e in events(tmp_path)[hang_at:]))
        stepped = record(0)["step"]
        wait_for(lambda: record(0)["step"] > stepped)  # the survivor steps on alone
        assert survivor in elastic_workers(tmp_path) and victim not in elastic_workers(tmp_path)
        wait_for(lambda: any(e["kind"] == "resumed" and e["size"] == 2 for e in events(tmp_path)[hang_at:]))
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        with contextlib.suppress(ProcessLookupError):
            if victim:  # (0 would be this test's own process group)
                os.kill(victim, signal.SIGKILL)
    assert code == 0, f"{out[-3000:]}\n{err[-3000:]}"
    (hang,) = [e for e in events(tmp_path) if e["kind"] == "hang"]  # the stopped worker only
    assert hang["pid"] == victim and hang["stopped"] and hang["by"] == "launcher", hang
    assert "launcher: horovod elastic: hang: the worker on slot" in err
    stacks = Path(hang["stacks"])
    assert stacks == attempt / "slot1" / "0" / "rank1.stacks"
    assert "most recent call first" in stacks.read_text()  # faulthandler's dump of the stopped worker
    # each worker's records are its own: the first on slot 1 kept, the second beside it, the survivor's untouched
    assert json.loads((attempt / "slot1" / "0" / "rank1.progress").read_text())["pid"] == victim
    again = json.loads((attempt / "slot1" / "1" / "rank1.progress").read_text())
    assert again["pid"] not in (victim, survivor) and again["phase"] == "done"
    assert record(1) == again and record(0)["pid"] == survivor  # the attempt folder's links: each slot's newest
    assert json.loads((attempt / "rank1.exit.json").read_text())["exit_code"] == 0
    slots = [(e["kind"], e["slot"]) for e in events(tmp_path) if e["kind"] in ("failure", "rejoin")]
    assert slots == [("failure", hang["slot"]), ("rejoin", hang["slot"])], slots
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 600
    assert not run_processes(tmp_path)
