"""Sweeps (`-m`, Hydra multirun): expansion by Hydra, checks before anything starts, the local loop with real
runs (a failed member, a rerun that skips finished ones), summary.csv, TensorBoard hparams across members, the
Slurm job array script, and a Hydra sweeper plugin (Optuna) where one is installed."""

from __future__ import annotations

import csv
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_launcher

from launcher.cli import main
from launcher.config.compose import DEFAULT_CONFIG_DIR
from launcher.sweep import record as sweep_record
from launcher.sweep.multirun import expand, member_name
from launcher.sweep.record import Member

TINY = ["trainer.max_steps=4", "trainer.log_every=1", "trainer.eval_every=1000", "trainer.checkpoint_every=1000"]


def summary(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def one_line_error(err: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error:") and message in lines[0], err


# -- expansion and names (Hydra's parser and basic sweeper) ------------------------------------------------------
def test_grid_is_hydras_cartesian_product_in_order() -> None:
    members = expand(["optimizer.lr=1e-3,3e-3", "model.hidden=range(64,129,64)", "trainer.max_steps=5"],
                     DEFAULT_CONFIG_DIR)
    assert [m.overrides for m in members] == [
        ["optimizer.lr=0.001", "model.hidden=64", "trainer.max_steps=5"],
        ["optimizer.lr=0.001", "model.hidden=128", "trainer.max_steps=5"],
        ["optimizer.lr=0.003", "model.hidden=64", "trainer.max_steps=5"],
        ["optimizer.lr=0.003", "model.hidden=128", "trainer.max_steps=5"]]
    assert [m.name for m in members] == ["0-optimizer.lr=0.001,model.hidden=64",
                                         "1-optimizer.lr=0.001,model.hidden=128",
                                         "2-optimizer.lr=0.003,model.hidden=64",
                                         "3-optimizer.lr=0.003,model.hidden=128"]
    assert members[3].params == {"optimizer.lr": "0.003", "model.hidden": "128"}  # the swept keys only


def test_glob_and_choice_use_the_config_groups() -> None:
    members = expand(["optimizer=glob(adam*)", "++model.note=choice(a,'b c')"], DEFAULT_CONFIG_DIR)
    assert [m.params for m in members] == [
        {"optimizer": "adam", "model.note": "a"}, {"optimizer": "adam", "model.note": "b\\ c"},
        {"optimizer": "adamw", "model.note": "a"}, {"optimizer": "adamw", "model.note": "b\\ c"}]
    assert members[1].name == "1-optimizer=adam,model.note=b__c"  # no backslash or space in a directory name


def test_member_names_are_safe_directory_names() -> None:
    assert member_name(3, 2, {"data.path": "/tmp/x y/$(id)"}) == "03-data.path=_tmp_x_y___id_"
    assert member_name(0, 1, {}) == "0"
    assert len(member_name(0, 1, {"k": "v" * 500})) == 2 + 80


# -- bad input: exit 2, one line, nothing started ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.hidden=64,-1"], "sweep member 1-model.hidden=-1"),  # only one member is bad: none starts
        (["trainer.max_steps=5,0"], "sweep member 1-trainer.max_steps=0"),
        (["trainer.nope=1,2"], "sweep member 0-trainer.nope=1"),
        (["optimizer.lr=interval(0.001,0.1)"], "interval() needs a sweeper plugin"),
        (["optimizer.lr=range(1"], "bad sweep override optimizer.lr=range(1"),
        (["hydra/sweeper=no_such_sweeper", "optimizer.lr=1,2"], "hydra/sweeper=no_such_sweeper is not installed"),
        (["--max-parallel", "2", "optimizer.lr=1,2"], "--max-parallel applies to --slurm sweeps"),
        (["--objective", "test/loss", "optimizer.lr=1,2"], "--objective is the value a sweeper plugin optimizes"),
        (["--wait", "optimizer.lr=1,2"], "--wait only applies to --slurm"),  # what a launch checks, checked first
        (["--nodes", "2", "optimizer.lr=1,2"], "needs --node-rank and --master-addr"),
    ],
)
def test_bad_sweep_is_exit_2_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], args: list[str],
                                                    message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--gpus", "1", "-m", "--runs-root", str(tmp_path / "runs"), "--name", "s", *args]) == 2
    out, err = capsys.readouterr()
    one_line_error(err, message)
    assert out == ""
    assert not (tmp_path / "runs").exists()


def test_sweep_flags_without_m_and_a_script_sweep_are_usage_errors(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--max-parallel", "2", "--run-dir", str(tmp_path / "r")]) == 2
    one_line_error(capsys.readouterr().err, "are for sweeps. HINT: add -m")
    script = tmp_path / "s.py"
    script.write_text("")
    assert main(["-m", "--run-dir", str(tmp_path / "r"), "--", str(script)]) == 2
    one_line_error(capsys.readouterr().err, "not a script after `--`")
    assert not (tmp_path / "r").exists()


def test_dry_run_lists_members_and_their_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = tmp_path / "runs" / "s"
    assert main(["--gpus", "2", "-m", "--dry-run", "--run-dir", str(sweep_dir), "optimizer.lr=1e-3,3e-3",
                 "model.hidden=64,128", "trainer.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"launcher: dry run, nothing started; sweep of 4 members in {sweep_dir}:\n"
                          "  0-optimizer.lr=0.001,model.hidden=64: optimizer.lr=0.001 model.hidden=64 "
                          "trainer.max_steps=5\n")
    for name in ("0-optimizer.lr=0.001,model.hidden=64", "3-optimizer.lr=0.003,model.hidden=128"):
        assert f"run dir         {sweep_dir / name}\n" in out
        assert f"--run-dir '{sweep_dir / name}'" in out or f"--run-dir {sweep_dir / name}" in out
    assert out.count("launcher: dry run, nothing started\n") == 4  # each member's plan, as a single run prints it
    assert not sweep_dir.exists()


# -- Slurm: one job array --------------------------------------------------------------------------------------
def test_slurm_sweep_renders_one_array_with_a_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = tmp_path / "s"
    assert main(["--slurm", "--gpus", "1", "-m", "--max-parallel", "2", "--dry-run", "--run-dir", str(sweep_dir),
                 "--max-restarts", "1", "optimizer.lr=1e-3,3e-3", "model.hidden=64,128"]) == 0
    out = capsys.readouterr().out
    assert "launcher: sweep of 4 members as Slurm job array 0-3%2" in out
    for line in ("#SBATCH --array=0-3%2", f"#SBATCH --output={sweep_dir}/slurm-%A_%a.out", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@120", f"SWEEP_DIR={sweep_dir}", "set -- --max-restarts 1",
                 'scontrol requeue "$JOB"',
                 "JOB=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID:-}}"):
        assert line + "\n" in out, line
    assert "optimizer.lr" not in out.split("the sbatch script:")[1]  # overrides come from members.json, not the text
    script = out.split("the sbatch script:\n", 1)[1]
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert not sweep_dir.exists()
    # no %K when every member may run at once
    assert main(["--slurm", "-m", "--dry-run", "--run-dir", str(sweep_dir), "optimizer.lr=1e-3,3e-3"]) == 0
    assert "#SBATCH --array=0-1\n" in capsys.readouterr().out


def test_array_task_reads_its_member_quoted_and_skips_a_finished_one(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The job block as bash runs it: the task's run directory and overrides arrive as the exact words of
    members.json (no shell parsing of user text); a finished member exits 0 without running."""
    sweep_dir = tmp_path / "sweep dir;$(touch pwned)"
    hostile = ["data.path=/tmp/a b", "x=$(touch pwned)", "y=`id`;rm -rf ~", "z='q'\"d\""]
    sweep_record.write_members(sweep_dir, [
        Member(index=0, name="0-a", overrides=hostile, max_steps=5),
        Member(index=1, name="1-b", overrides=["trainer.max_steps=5"], max_steps=5)])
    (sweep_dir / "1-b").mkdir()
    (sweep_dir / "1-b" / "result.json").write_text(json.dumps({"step": 5}))
    assert main(["--slurm", "-m", "--dry-run", "--run-dir", str(tmp_path / "x"), "optimizer.lr=1e-3,3e-3"]) == 0
    script = capsys.readouterr().out.split("the sbatch script:\n", 1)[1]
    block = script.split("# ---- launcher:job")[1].split("\n", 1)[1].split("# ---- end launcher:job ----")[0]
    block = block.replace(f"SWEEP_DIR={tmp_path / 'x'}", f"SWEEP_DIR={shlex.quote(str(sweep_dir))}")

    def task(index: int) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", "set -u\n" + block + 'printf "%s\\n" "$RUN_DIR" "$@"'], cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": str(index),
                                   "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                              capture_output=True, text=True)

    ran = task(0)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [str(sweep_dir / "0-a"), *hostile]
    assert sweep_record.status(sweep_dir / "0-a")["status"] == "running"
    skipped = task(1)
    assert skipped.returncode == 0 and "finished earlier" in skipped.stdout and str(sweep_dir) not in skipped.stdout
    assert task(7).returncode == 2  # no such member
    assert not (tmp_path / "pwned").exists()
    sweep_record.task_end(sweep_dir, 0, 3, preempted=False)
    rows = summary(sweep_dir)
    assert [(r["member"], r["status"], r["exit_code"]) for r in rows] == [("0-a", "failed", "3"),
                                                                          ("1-b", "finished", "0")]


def test_summary_rows_from_member_files(tmp_path: Path) -> None:
    listed = [Member(index=i, name=f"{i}-lr={lr}", overrides=[f"optimizer.lr={lr}"], params={"optimizer.lr": lr},
                     max_steps=10) for i, lr in enumerate(("0.1", "0.2", "0.3"))]
    sweep_record.write_members(tmp_path, listed)
    on_disk = json.loads((tmp_path / "members.json").read_text())  # the format array tasks and reruns read
    assert on_disk["members"][2] == {"index": 2, "name": "2-lr=0.3", "overrides": ["optimizer.lr=0.3"],
                                     "params": {"optimizer.lr": "0.3"}, "max_steps": 10}
    assert sweep_record.members(tmp_path) == listed
    sweep_record.update_status(tmp_path / "0-lr=0.1", listed[0], status="finished", exit_code=0, wall_s=12.34)
    (tmp_path / "0-lr=0.1" / "result.json").write_text(json.dumps({"step": 10, "test/loss": 0.5,
                                                                   "test/accuracy": 0.75}))
    sweep_record.update_status(tmp_path / "1-lr=0.2", listed[1], status="failed", exit_code=1, wall_s=3.0)
    sweep_record.write_summary(tmp_path)
    rows = summary(tmp_path)
    assert list(rows[0]) == ["index", "member", "status", "exit_code", "optimizer.lr", "step", "train/loss",
                             "test/loss", "test/accuracy", "wall_s", "overrides"]
    assert [(r["status"], r["exit_code"], r["step"], r["test/loss"], r["wall_s"]) for r in rows] == [
        ("finished", "0", "10", "0.5", "12.3"), ("failed", "1", "", "", "3.0"), ("pending", "", "", "", "")]
    assert sweep_record.finished(tmp_path / "0-lr=0.1", 10) and not sweep_record.finished(tmp_path / "0-lr=0.1", 11)
    assert not sweep_record.finished(tmp_path / "1-lr=0.2", 10)


# -- real runs -------------------------------------------------------------------------------------------------
def hparams_of(run_dir: Path) -> dict[str, object]:
    """The hparams TensorBoard's HPARAMS plugin reads for one member (its session start info)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir / "tb" / "hparams"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


@pytest.mark.slow
def test_two_by_two_sweep_runs_every_member_and_a_rerun_skips_them(tmp_path: Path) -> None:
    args = ["--gpus", "2", "-m", "--runs-root", str(tmp_path / "runs"), "--name", "grid",
            "optimizer.lr=1e-3,3e-3", "model.hidden=32,64", *TINY]
    first = run_launcher(args, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "grid"
    names = ["0-optimizer.lr=0.001,model.hidden=32", "1-optimizer.lr=0.001,model.hidden=64",
             "2-optimizer.lr=0.003,model.hidden=32", "3-optimizer.lr=0.003,model.hidden=64"]
    for name in names:  # each a complete run of its own
        assert json.loads((sweep_dir / name / "result.json").read_text())["step"] == 4
        assert list((sweep_dir / name / "checkpoints").glob("step-00000004.pt"))
        assert "hidden: " + name[-2:] in (sweep_dir / name / "config.yaml").read_text()
    rows = summary(sweep_dir)
    assert [r["member"] for r in rows] == names
    assert {r["status"] for r in rows} == {"finished"} and {r["exit_code"] for r in rows} == {"0"}
    assert [(r["optimizer.lr"], r["model.hidden"]) for r in rows] == [("0.001", "32"), ("0.001", "64"),
                                                                      ("0.003", "32"), ("0.003", "64")]
    assert all(float(r["train/loss"]) > 0 and 0 <= float(r["test/accuracy"]) <= 1 and float(r["wall_s"]) > 0
               for r in rows)
    # TensorBoard's HPARAMS plugin compares the members: each has a session with the swept keys' values
    assert [(hparams_of(sweep_dir / n)["optimizer.lr"], hparams_of(sweep_dir / n)["model.hidden"]) for n in names] \
        == [(0.001, 32), (0.001, 64), (0.003, 32), (0.003, 64)]
    assert "all 4 members finished" in first.stdout

    again = run_launcher(args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier, skipped") == 4 and "launcher: starting" not in again.stdout


def has_optuna_sweeper() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ImportError:  # no hydra_plugins package at all
        return False


FLAKY = """
import os
from workers.data.builtin import digits

def make_data(fail: bool = False):
    if fail and os.path.exists(os.environ["FLAKY_FLAG"]):
        raise RuntimeError("this member's data is broken")
    return digits()
"""


@pytest.mark.slow
def test_a_failed_member_does_not_stop_the_sweep_and_a_rerun_retries_it(tmp_path: Path) -> None:
    (tmp_path / "flaky.py").write_text(FLAKY)
    flag = tmp_path / "broken"
    flag.touch()
    args = ["--gpus", "1", "-m", "--runs-root", str(tmp_path / "runs"), "--name", "flaky",
            "data._target_=flaky.make_data", "data.fail=true,false", *TINY]
    first = run_launcher(args, cwd=tmp_path, env={"FLAKY_FLAG": str(flag)}, timeout=600)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert "1 of 2 members failed: 0-data.fail=True (exit 1)" in first.stderr
    sweep_dir = tmp_path / "runs" / "flaky"
    rows = summary(sweep_dir)
    assert [(r["member"], r["status"], r["exit_code"]) for r in rows] == [("0-data.fail=True", "failed", "1"),
                                                                          ("1-data.fail=False", "finished", "0")]
    assert not (sweep_dir / "0-data.fail=True" / "result.json").exists()
    assert (sweep_dir / "1-data.fail=False" / "result.json").exists()  # the member after the failed one ran

    flag.unlink()  # the failure is fixed: a rerun retries the failed member and skips the finished one
    again = run_launcher(args, cwd=tmp_path, env={"FLAKY_FLAG": str(flag)}, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep member 2/2 1-data.fail=False: finished earlier, skipped" in again.stdout
    assert again.stdout.count("launcher: starting") == 1
    assert [(r["status"], r["exit_code"]) for r in summary(sweep_dir)] == [("finished", "0"), ("finished", "0")]


@pytest.mark.slow
@pytest.mark.skipif(not has_optuna_sweeper(), reason="hydra-optuna-sweeper is not installed")
def test_optuna_sweeper_proposes_members_that_run_as_normal_runs(tmp_path: Path) -> None:
    args = ["--gpus", "1", "-m", "--runs-root", str(tmp_path / "runs"), "--name", "opt", "hydra/sweeper=optuna",
            "optimizer.lr=interval(0.001,0.01)", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0", *TINY]
    first = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    sweep_dir = tmp_path / "runs" / "opt"
    rows = summary(sweep_dir)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    assert all(0.001 <= float(r["optimizer.lr"]) <= 0.01 for r in rows)
    assert (sweep_dir / "optimization_results.yaml").exists()
    # the same seed proposes the same members: a rerun skips them, and Optuna still gets their results
    again = subprocess.run([sys.executable, "-m", "launcher", *args], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2, again.stderr[-3000:]
