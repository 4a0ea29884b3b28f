"""The user's own model and data, defined outside the repository, trained through the launcher's trainer.

The task lives in a temporary directory (``mytask.py``): a module with LayerNorm and a map-style dataset
that is not a TensorDataset, so batches go through DataLoader workers (``data.num_workers=2``). Runs are
started from that directory, as a user would, on the torchrun, horovod and mpi backends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    assert_bitwise_equal,
    finish,
    leftover_processes,
    newest_weights,
    rank_pids,
    run_launcher,
    run_processes,
    seen_samples,
    wait_for,
)

from launcher.config.compose import compose_config
from launcher.errors import UsageError

TASK = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import Dataset


    class Net(nn.Module):
        def __init__(self, features: int, classes: int, width: int = 32) -> None:
            super().__init__()
            if width <= 0:
                raise ValueError("width must be positive")
            self.body = nn.Sequential(nn.Linear(features, width), nn.LayerNorm(width), nn.ReLU(),
                                      nn.Linear(width, classes))

        def forward(self, x):
            return self.body(x)


    class Blobs(Dataset):
        """Gaussian blobs, one per class; a plain map-style dataset (per-sample __getitem__ + collate)."""

        def __init__(self, n: int, features: int, classes: int, seed: int) -> None:
            centers = torch.randn(classes, features, generator=torch.Generator().manual_seed(0)) * 2
            g = torch.Generator().manual_seed(seed)
            self.y = torch.randint(0, classes, (n,), generator=g)
            self.x = centers[self.y] + torch.randn(n, features, generator=g)

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int):
            return self.x[i], self.y[i]


    def make_data(n: int = 512, features: int = 8, classes: int = 3):
        return Blobs(n, features, classes, seed=0), Blobs(n // 4, features, classes, seed=1)


    def missing_data(path: str = "no/such/file.bin"):
        return open(path, "rb")  # raises on every rank, after the plan-time checks passed
''')

USER = ["model._target_=mytask.Net", "model.features=8", "model.classes=3", "data._target_=mytask.make_data",
        "data.n=512", "data.num_workers=2", "trainer.log_every=5", "trainer.eval_every=1000"]
# 512 samples, 32 per rank, 2 ranks: 8 steps an epoch


@pytest.fixture
def user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "project"
    d.mkdir()
    (d / "mytask.py").write_text(TASK)
    return d


def _start(user_dir: Path, run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The launcher started from the user's directory (outside the repository)."""
    return subprocess.Popen([sys.executable, "-m", "launcher", "--gpus", "2", "--run-dir", str(run_dir), *USER, *args],
                            cwd=user_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def _run(user_dir: Path, run_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    code, out, err = finish(_start(user_dir, run_dir, *args, env=env))
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out


# -- plan-time checks (in-process, quick) ------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["model._target_=nope_pkg.Net"], "no module 'nope_pkg'"),
    (["model._target_=mytask.Nett"], "mytask has no attribute 'Nett'"),
    (["model._target_=mytask.torch"], "is a module, not a class or function"),
    (["model._target_=mytask.Net", "model.features=8"], "missing 1 required positional argument: 'classes'"),
    (["model._target_=mytask.Net", "model.features=8", "model.classes=3", "model.width=0"],
     "raised ValueError: width must be positive"),
    (["model._target_=mytask.Net", "model.features=8", "model.classes=3", "model.depth=2"],
     "unexpected keyword argument 'depth'"),
    (["data._target_=mytask.make_data", "data.size=3"], "data: mytask.make_data: got an unexpected keyword"),
    (["optimizer._target_=torch.optim.RMSprop", "optimizer.momentm=0.9"], "unexpected keyword argument 'momentm'"),
    (["loss._target_=torch.nn.MSELoss", "loss.size_avg=1"], "loss: torch.nn.MSELoss"),
    (["model._target_=1bad"], "model._target_='1bad' is invalid"),
])
def test_bad_targets_are_one_line_usage_errors(user_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               overrides: list[str], message: str) -> None:
    monkeypatch.chdir(user_dir)
    monkeypatch.syspath_prepend(str(user_dir))
    with pytest.raises(UsageError) as e:
        compose_config(overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_switching_a_target_drops_the_presets_keys(user_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(user_dir)
    monkeypatch.syspath_prepend(str(user_dir))
    cfg = compose_config(USER)
    assert cfg.model == {"_target_": "mytask.Net", "features": 8, "classes": 3}  # no mlp hidden/inputs
    assert cfg.data["_target_"] == "mytask.make_data" and "test_fraction" not in cfg.data
    assert cfg.data["num_workers"] == 2 and cfg.data["batch_size"] == 32  # the loader's own keys stay


@pytest.mark.slow
def test_bad_target_from_the_command_line_starts_nothing(user_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for bad in (["model._target_=missing_mod.Net"], ["model._target_=mytask.Nope"],
                ["model._target_=mytask.Net", "model.features=8", "model.classes=3", "model.width=-1"]):
        result = run_launcher(["--gpus", "2", "--run-dir", str(run_dir), *bad], cwd=user_dir)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("launcher: error:")
        assert not run_dir.exists() and not run_processes(run_dir)


@pytest.mark.slow
def test_build_failing_on_the_ranks_is_reported_once(user_dir: Path, tmp_path: Path) -> None:
    result = run_launcher(["--gpus", "2", "--run-dir", str(tmp_path / "run"), "data._target_=mytask.missing_data"],
                          cwd=user_dir)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "building the task failed on rank(s) [0, 1]" in out and "FileNotFoundError" in out
    assert not [ln for ln in out.splitlines() if ln.startswith("[rank1]:") and "Traceback" in ln]
    assert not run_processes(tmp_path / "run")


# -- real runs -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_user_task_kill_and_resume_is_bitwise_equal_and_sees_each_sample_once(user_dir: Path, tmp_path: Path) -> None:
    every = ["trainer.checkpoint_every=6"]
    reference = tmp_path / "reference"
    _run(user_dir, reference, *every, "trainer.max_steps=24")
    result = json.loads((reference / "result.json").read_text())
    assert result["test/accuracy"] > 0.9 and "test/loss" in result

    # SIGKILL a rank after step 12's checkpoint: torchrun restarts both, they resume from the checkpoint
    killed = tmp_path / "killed"
    proc = _start(user_dir, killed, *every, "trainer.max_steps=24", "--max-restarts", "1",
                  env={"LAUNCHER_TEST_SLOW_STEP_S": "0.2"})
    wait_for(lambda: (killed / "checkpoints" / "step-00000012.json").exists())
    os.kill(rank_pids(killed)[1], signal.SIGKILL)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    # from step 12's checkpoint, or step 18's where the kill came late (the bits are what must agree)
    assert "resuming from step 12" in out or "resuming from step 18" in out, out[-3000:]
    assert_bitwise_equal(newest_weights(killed), newest_weights(reference))

    # stop cleanly at step 11 (mid-epoch 1), resume to 24: every sample of each epoch exactly once
    logs = tmp_path / "samples"
    logs.mkdir()
    split = tmp_path / "split"
    _run(user_dir, split, *every, "trainer.max_steps=11", env={"LAUNCHER_TEST_SAMPLE_LOG": str(logs)})
    out = _run(user_dir, split, *every, "trainer.max_steps=24", env={"LAUNCHER_TEST_SAMPLE_LOG": str(logs)})
    assert "resuming from step 11" in out
    seen = seen_samples(logs)
    for epoch in (0, 1, 2):
        indices = [i for e, i in seen if e == epoch]
        assert sorted(indices) == list(range(512)), f"epoch {epoch}: a sample trained twice or skipped"
    assert_bitwise_equal(newest_weights(split), newest_weights(reference))
    assert leftover_processes(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param("horovod", marks=pytest.mark.horovod),
                                     pytest.param("mpi", marks=pytest.mark.mpi)])
def test_user_task_trains_under_other_backends(user_dir: Path, tmp_path: Path, backend: str) -> None:
    if shutil.which("mpirun") is None:
        pytest.skip("needs mpirun: bash scripts/setup.sh --test")
    if backend == "horovod":
        pytest.importorskip("horovod.torch")
    run_dir = tmp_path / "run"
    _run(user_dir, run_dir, "--backend", backend, "trainer.max_steps=24", "trainer.checkpoint_every=12")
    assert json.loads((run_dir / "result.json").read_text())["test/accuracy"] > 0.9
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == ["step-00000012.pt", "step-00000024.pt"]


def test_user_module_is_found_outside_the_repository(user_dir: Path) -> None:
    assert not str(user_dir).startswith(str(ROOT))


@pytest.mark.slow
def test_readme_train_your_own_model_section_works_as_written(tmp_path: Path) -> None:
    """The README's "Train your own model" code and command, run as a new user would (fewer steps)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Train your own model", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    command = section.split("```bash\n", 1)[1].split("\n", 2)
    argv = (command[0].rstrip("\\") + command[1]).split()
    assert argv[:3] == ["python", "-m", "launcher"] and "--name" in argv
    (tmp_path / "my_task.py").write_text(code)
    argv = [a.replace("trainer.max_steps=300", "trainer.max_steps=150") for a in argv[3:]]
    result = run_launcher([*argv, "--runs-root", str(tmp_path / "runs")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "mine" / "result.json").read_text())["test/accuracy"] > 0.8


@pytest.mark.slow
def test_resume_with_another_model_is_refused_and_harmless_changes_are_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = ["--gpus", "2", "--run-dir", str(run_dir), "trainer.checkpoint_every=10", "trainer.eval_every=1000"]
    assert run_launcher([*common, "trainer.max_steps=20"]).returncode == 0
    before = (run_dir / "config.yaml").read_bytes()
    for changed, keys in ((["model.hidden=64"], "model.hidden"), (["optimizer=sgd"], "optimizer._target_"),
                          (["data=synthetic"], "data._target_")):
        result = run_launcher([*common, "trainer.max_steps=30", *changed])
        assert result.returncode == 2 and keys in result.stderr and "--no-resume" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert (run_dir / "config.yaml").read_bytes() == before
    result = run_launcher([*common, "trainer.max_steps=30", "schedule=cosine", "optimizer.lr=0.001"])
    assert result.returncode == 0 and "resuming from step 20" in result.stdout
    history = list((run_dir / "config_history").glob("config-*.yaml"))
    assert [p.read_bytes() for p in history] == [before]
    assert "max_steps: 30" in (run_dir / "config.yaml").read_text()
