"""Property test: whatever flags, values and overrides a user throws at the CLI (in dry-run), the launcher
exits 0 or 2, an error is one line (never a traceback), and no run directory appears on an error."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher.cli import main

NUMBERS = st.one_of(st.integers(-5, 70000).map(str), st.sampled_from(["0", "1", "2", "-1", "1e3", "nan", "x", ""]))
FLAGS = {
    "--nodes": NUMBERS, "--gpus": NUMBERS, "--node-rank": NUMBERS, "--master-port": NUMBERS,
    "--max-restarts": NUMBERS, "--ssh-timeout": NUMBERS, "--fusion-threshold-mb": NUMBERS,
    "--cycle-time-ms": NUMBERS, "--usr1-before": NUMBERS, "--cpus-per-task": NUMBERS,
    "--backend": st.sampled_from(["torchrun", "horovod", "mpi", "nope", ""]),
    "--controller": st.sampled_from(["gloo", "mpi", "tcp"]),
    "--master-addr": st.sampled_from(["10.0.0.1", "node0", "", "a b"]),
    "--name": st.sampled_from(["run", "a/b", "x y", ""]),
}
KEYS = ["trainer.max_steps", "optimizer.lr", "data.batch_size", "data.num_workers", "model.hidden", "model._target_",
        "optimizer._target_", "loss._target_", "trainer.precision", "mode", "schedule", "optimizer", "model", "nope.x",
        "trainer.nope", "+trainer.x", "~metrics.accuracy", "metrics", "data.path"]
VALUES = ["1", "0", "-3", "0.5", "abc", "", "???", "[1,2]", "{}", "null", "torch.nn.Linear", "sgd", "online", "bf16",
          "nope.Mod", "${data.context}", "'quoted'", "a=b"]
WORDS = st.one_of(
    st.sampled_from(sorted(FLAGS)).flatmap(lambda flag: FLAGS[flag].map(lambda value: (flag, value))),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.sampled_from(VALUES)),
    st.sampled_from(["--bogus", "--dry-run", "--no-resume", "--slurm", "-x", "plain", "=", "--gpus"]),
)


@pytest.mark.slow
# capsys: read (and so reset) once per example
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(WORDS, max_size=6))
def test_cli_exits_0_or_2_with_one_line(capsys: pytest.CaptureFixture[str], words: list) -> None:
    argv: list[str] = []
    for word in words:
        if isinstance(word, tuple):  # a flag and a value drawn for it
            argv += list(word)
        else:
            argv.append(word)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        code = main([*argv, "--dry-run", "--run-dir", str(run_dir), "--runs-root", tmp])
        out, err = capsys.readouterr()
        assert code in (0, 2), (argv, code, err)
        if code == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("launcher: error:"), (argv, err)
            assert not run_dir.exists() and list(Path(tmp).iterdir()) == [], argv
        assert "Traceback" not in out + err, argv
