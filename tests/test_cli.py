"""The command line through a real `python -m launcher`: bad input exits 2 with one line, starting nothing.

These start the launcher process but never a rank (bad input is rejected before the supervisor runs, and
--dry-run stops there too), so they belong to the quick tier.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import run_launcher

from launcher.cli import main
from launcher.config.compose import compose_config
from workers.config import to_yaml

# A script that leaves a mark if anything ever runs it: proof that bad input started no rank.
SENTINEL = "import os, pathlib; pathlib.Path(os.environ['SENTINEL_DIR'], os.environ.get('RANK', 'x')).touch()\n"


def assert_one_line_usage_error(proc_or_err: object, message: str) -> None:
    err = proc_or_err if isinstance(proc_or_err, str) else proc_or_err.stderr  # type: ignore[attr-defined]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("launcher: error:") and message in lines[0], err


# The bad-input cases, through the real entry point (`python -m launcher`).
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["trainer.nope=1"], "bad config override"),
        (["--gpus", "0"], "argument --gpus: 0 must be at least 1"),
        (["--nodes", "2"], "needs --node-rank and --master-addr"),
        (["--", "missing_script.py"], "script missing_script.py not found"),
        (["--", "-m"], "-m"),  # BUG: IndexError traceback from LaunchPlan.rank_marker (see test_plan)
    ],
    ids=["unknown-flag", "unknown-override", "gpus-0", "nodes-2-alone", "missing-script", "dash-m-no-module"],
)
def test_bad_input_exits_2_with_one_line_and_no_run_dir(tmp_path: Path, args: list[str], message: str) -> None:
    run_dir = tmp_path / "run"
    proc = run_launcher(["--gpus", "1", "--run-dir", str(run_dir), *args], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_usage_error(proc, message)
    assert proc.stdout == ""  # not even "launcher: starting"
    assert not run_dir.exists()


# More bad input, in-process through main(argv) (same code path, without an interpreter start each).
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trainer.max_steps=abc"], "bad config override"),
        (["optimizer=nope"], "bad config override"),
        (["trainer.max_steps=0"], "trainer.max_steps=0 is invalid"),
        (["--gpus", "two"], "argument --gpus: 'two' is not an integer"),
        (["--nodes", "0"], "argument --nodes: 0 must be at least 1"),
        (["--master-port", "70000"], "70000 must be within 1..65535"),
        (["--ssh-timeout", "-1"], "-1 must be at least 1"),
        (["--cycle-time-ms", "nan"], "nan must be at least 0.001"),
        (["--nodes", "2", "--node-rank", "0"], "needs --node-rank and --master-addr"),
        (["--nodes", "2", "--master-addr", "n0"], "needs --node-rank and --master-addr"),
        (["--nodes", "2", "--node-rank", "5", "--master-addr", "n0"], "--node-rank 5 is outside 0..1"),
        (["--hostfile", "/nonexistent/hosts", "--backend", "horovod"], "does not exist"),
        (["--backend", "nope"], "invalid choice"),
        (["--", "x.py", "trainer.max_steps=1"], "not found"),
        (["--"], "nothing after `--`"),
        (["--", "run.sh"], "not found"),
    ],
)
def test_more_bad_input_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["--gpus", "1", "--run-dir", str(run_dir), *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_line_usage_error(err, message)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "flags",
    [["--bogus"], ["--gpus", "0"], ["--nodes", "2"], ["--nodes", "2", "--master-addr", "n0"],
     ["--backend", "nope"], ["--max-restarts", "-1"]],
    ids=lambda f: " ".join(f),
)
def test_bad_flags_start_no_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str], flags: list[str]) -> None:
    script, marks = tmp_path / "sentinel.py", tmp_path / "marks"
    script.write_text(SENTINEL)
    marks.mkdir()
    monkeypatch.setenv("SENTINEL_DIR", str(marks))  # what a rank would inherit, had one been started
    assert main(["--run-dir", str(tmp_path / "run"), *flags, "--", str(script)]) == 2
    assert_one_line_usage_error(capsys.readouterr().err, "")
    assert list(marks.iterdir()) == []
    assert not (tmp_path / "run").exists()


def _existing_run(run_dir: Path) -> dict[Path, bytes]:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "tb").mkdir()
    files = {run_dir / "config.yaml": to_yaml(compose_config(["trainer.max_steps=7"])).encode(),
             run_dir / "checkpoints" / "step-00000007.pt": b"weights",
             run_dir / "checkpoints" / "step-00000007.json": b'{"step": 7}',
             run_dir / "tb" / "events.out.tfevents.1": b"events",
             run_dir / "plan.json": b"{}"}
    for path, content in files.items():
        path.write_bytes(content)
    return files


def _snapshot(run_dir: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(run_dir)): (p.read_bytes() if p.is_file() else None) for p in run_dir.rglob("*")}


def test_bad_override_leaves_an_existing_run_dir_untouched(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _existing_run(run_dir)
    before = _snapshot(run_dir)
    proc = run_launcher(["--run-dir", str(run_dir), "trainer.max_step=9"], timeout=120)
    assert proc.returncode == 2
    assert_one_line_usage_error(proc, "trainer.max_step")
    assert _snapshot(run_dir) == before  # config.yaml and checkpoints byte-identical


@pytest.mark.parametrize(
    "args",
    [["optimizer=nope"], ["--gpus", "0"], ["--no-resume", "trainer.max_step=9"], ["--no-resume", "--gpus", "0"],
     ["--no-resume", "--dry-run"], ["--dry-run", "trainer.max_steps=3"]],
    ids=lambda a: " ".join(a),
)
def test_existing_run_dir_untouched_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              args: list[str]) -> None:
    run_dir = tmp_path / "run"
    _existing_run(run_dir)
    before = _snapshot(run_dir)
    code = main(["--run-dir", str(run_dir), *args])
    out, err = capsys.readouterr()
    if "--dry-run" in args:
        assert code == 0 and "dry run, nothing started" in out, err
    else:
        assert code == 2
        assert_one_line_usage_error(err, "")
    assert _snapshot(run_dir) == before  # nothing rewritten, nothing moved aside by --no-resume


def test_dry_run_prints_the_commands_and_starts_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_launcher(["--gpus", "2", "--run-dir", str(run_dir), "--dry-run", "optimizer=sgd"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "dry run, nothing started" in proc.stdout
    assert "-m torch.distributed.run --nnodes 1 --nproc-per-node 2 --rdzv-backend c10d" in proc.stdout
    assert f"-m workers.train --run-dir {run_dir}" in proc.stdout
    assert "OMP_NUM_THREADS=" in proc.stdout and "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE=" in proc.stdout
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--nodes", "2", "--gpus", "4", "--node-rank", "1", "--master-addr", "10.0.0.1"],
         ["--nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29500", "--rdzv-conf is_host=0",
          "world size      8"]),
        (["--backend", "horovod", "--gpus", "2"], ["horovodrun -np 2 -H localhost:2 --gloo"]),
        (["--backend", "horovod", "--gpus", "8", "--hosts", "node1,node2", "--controller", "mpi"],
         ["horovodrun -np 16 -H node1:8,node2:8 --mpi"]),
        (["--backend", "mpi", "--gpus", "2"], ["mpirun -np 2 -H localhost:2 --bind-to none"]),
    ],
    ids=["multi-node", "horovod", "horovod-hosts", "mpi"],
)
def test_dry_run_shapes_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                   expected: list[str]) -> None:
    assert main([*args, "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out
    assert not (tmp_path / "run").exists()


def test_dry_run_script_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "train.py"
    script.write_text("")
    assert main(["--gpus", "2", "--run-dir", str(tmp_path / "run"), "--dry-run", "--", str(script), "--x", "1"]) == 0
    assert f"--tee 3 -m workers.rank {script} --x 1" in capsys.readouterr().out  # run as is, reporting to us


def test_dry_run_of_thousands_of_hosts_stays_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """4,000 hosts: the summary folds equal rank counts into one short line, and every host still gets its
    command, once, on a line of its own (the output grows by a line or two per host, no more)."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"host{i} slots=8\n" for i in range(3998)) + "small0 slots=4\nsmall1 slots=4\n")
    assert main(["--hostfile", str(hostfile), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    summary = [line for line in lines if not line.startswith("  [")]
    assert "  ranks           8 ranks on each of 3998 nodes, 4 on 2" in summary
    assert "  world size      31992" in summary and max(map(len, summary)) < 200
    commands = [line.partition("] cmd: ")[::2] for line in lines if "] cmd: " in line]
    assert [name for name, _ in commands] == [f"  [host{i}" for i in range(3998)] + ["  [small0", "  [small1"]
    assert all(argv.startswith("ssh ") and " --nnodes 4000 " in argv for _, argv in commands)
    assert len(lines) <= len(summary) + 2 * 4000 and max(map(len, lines)) < 2000
    assert not (tmp_path / "run").exists()


def test_help_is_the_manual() -> None:
    proc = run_launcher(["--help"], timeout=120)
    assert proc.returncode == 0
    for text in ("--gpus", "--dry-run", "--backend", "--no-resume", "RANK, LOCAL_RANK, WORLD_SIZE", "Exit status"):
        assert text in proc.stdout


def test_run_dir_that_is_a_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """BUG: prepare_run_dir's mkdir raises FileExistsError (a traceback, exit 1) instead of exit 2 + one line."""
    not_a_dir = tmp_path / "run"
    not_a_dir.write_bytes(b"a file")
    assert main(["--gpus", "1", "--run-dir", str(not_a_dir), "trainer.max_steps=1"]) == 2
    assert_one_line_usage_error(capsys.readouterr().err, str(not_a_dir))
    assert not_a_dir.read_bytes() == b"a file"


def test_no_resume_twice_keeps_both_earlier_states(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Two --no-resume launches within the same second must not collide in previous/<timestamp>/.

    BUG: prepare_run_dir names the aside directory by the second only and creates it with mkdir(parents=True)
    (no exist_ok, no unique suffix): the second launch dies with FileExistsError."""
    from launcher.plan.planner import plan_launch
    from launcher.plan.types import LaunchOptions
    from launcher.supervise.job import prepare_run_dir

    run_dir = tmp_path / "run"
    plan = plan_launch(LaunchOptions(run_dir=run_dir, gpus=1), device_count=0, free_port=1, cpu_count=2,
                       python=sys.executable, env={})
    monkeypatch.setattr("launcher.cli.time.strftime", lambda _fmt: "20250101-000000")  # the same second
    for attempt in ("first", "second"):
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "step-00000001.pt").write_text(attempt)
        prepare_run_dir(plan, "seed: 0\n", fresh=True)
    kept = sorted(p.read_text() for p in (run_dir / "previous").glob("*/checkpoints/step-00000001.pt"))
    assert kept == ["first", "second"]  # neither earlier state deleted or overwritten
    assert not (run_dir / "checkpoints").exists()
    capsys.readouterr()
