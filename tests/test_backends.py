"""Horovod and MPI backends end to end: real horovodrun / mpirun, compared with torchrun."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import launch, newest_weights, scalars

SHORT = ["trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=1000", "trainer.checkpoint_every=1000"]

has_mpi = shutil.which("mpirun") is not None and importlib.util.find_spec("mpi4py") is not None
has_horovod = shutil.which("horovodrun") is not None and importlib.util.find_spec("horovod") is not None
needs_mpi = pytest.mark.skipif(not has_mpi, reason="needs mpirun and mpi4py: bash scripts/setup.sh --test")
needs_horovod = pytest.mark.skipif(not has_horovod, reason="needs horovod: bash scripts/install_horovod.sh")


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return scalars(run_dir, "train/loss")


def assert_same_series(a: list[tuple[int, float]], b: list[tuple[int, float]], rtol: float) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    assert len(a) >= 10
    torch.testing.assert_close(torch.tensor([v for _, v in a]), torch.tensor([v for _, v in b]), rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("torchrun")
    launch(run_dir, *SHORT)
    return run_dir


@pytest.mark.slow
@pytest.mark.mpi
@needs_mpi
def test_mpi_backend_matches_torchrun(tmp_path: Path, torchrun_run: Path) -> None:
    out, _ = launch(tmp_path, "--backend", "mpi", *SHORT)
    # mpirun's per-rank tags ([1,N]<stdout>:) become the [rankN]: every backend prints
    assert "[rank0]:ranks:" in out and "<stdout>:" not in out and "<stderr>:" not in out
    assert_same_series(losses(tmp_path), losses(torchrun_run), rtol=1e-5)
    assert list((tmp_path / "logs" / "mpi").rglob("stdout")), "per-rank log files"


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_trains_digits(tmp_path: Path, controller: str) -> None:
    launch(tmp_path, "--backend", "horovod", "--controller", controller)
    result = (tmp_path / "result.json").read_text()
    assert float(result.split('"test/accuracy":')[1].split(",")[0].strip(" }\n")) >= 0.95
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt"))  # rank 0 wrote checkpoints
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_horovod_matches_torchrun(tmp_path: Path, torchrun_run: Path) -> None:
    launch(tmp_path, "--backend", "horovod", *SHORT)
    assert_same_series(losses(tmp_path), losses(torchrun_run), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_checkpoints_cross_backends(tmp_path: Path) -> None:
    """horovod to step 40, torchrun resumes to 80 == torchrun 0..80 (and the other way round)."""
    common = ["trainer.log_every=10", "trainer.eval_every=1000", "trainer.checkpoint_every=20"]
    ref = tmp_path / "ref"
    launch(ref, *common, "trainer.max_steps=80")
    for first, second in (("horovod", "torchrun"), ("torchrun", "horovod")):
        run_dir = tmp_path / f"{first}-{second}"
        launch(run_dir, "--backend", first, *common, "trainer.max_steps=40")
        out, _ = launch(run_dir, "--backend", second, *common, "trainer.max_steps=80")
        assert "resuming from step 40" in out
        got, want = newest_weights(run_dir), newest_weights(ref)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.horovod
@needs_horovod
def test_unmodified_horovod_script(tmp_path: Path) -> None:
    script = tmp_path / "hvd_script.py"
    script.write_text(
        "import sys, horovod.torch as hvd, torch\n"
        "hvd.init()\n"
        "total = hvd.allreduce(torch.tensor([float(hvd.rank())]), op=hvd.Sum)\n"
        "open(f'{sys.argv[1]}/rank{hvd.rank()}', 'w').write(f'{hvd.size()} {int(total.item())}')\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    launch(tmp_path / "run", "--backend", "horovod", "--", str(script), str(out))
    assert {p.name: p.read_text() for p in out.iterdir()} == {"rank0": "2 1", "rank1": "2 1"}


TORCHRUN_STYLE = """
import os, sys
import torch, torch.distributed as dist
dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, as under torchrun
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
open(os.path.join(sys.argv[1], os.environ["RANK"]), "w").write(" ".join([*(os.environ[k] for k in keys),
                                                                         str(int(total.item()))]))
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", [
    "torchrun",
    pytest.param("mpi", marks=[pytest.mark.mpi, needs_mpi]),
    pytest.param("horovod", marks=[pytest.mark.horovod, needs_horovod]),
])
def test_one_torchrun_script_runs_unmodified_under_every_backend(tmp_path: Path, backend: str) -> None:
    """The same env contract on every backend (issue #24): a script written for torchrun, env:// rendezvous."""
    script, out = tmp_path / "torchrun_style.py", tmp_path / "out"
    script.write_text(TORCHRUN_STYLE)
    out.mkdir()
    launch(tmp_path / "run", "--backend", backend, "--", str(script), str(out))
    written = {p.name: p.read_text().split() for p in out.iterdir()}
    assert sorted(written) == ["0", "1"]
    for rank, (r, local, world, local_world, addr, port, total) in written.items():
        assert (r, local, world, local_world, total) == (rank, rank, "2", "2", "1")  # 0 + 1: a real all-reduce
        assert addr and port.isdigit()
    assert written["0"][4:6] == written["1"][4:6]


def test_horovod_missing_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from launcher.backends.horovodrun import HorovodBackend

    monkeypatch.setenv("PATH", "/nonexistent")  # no horovodrun on PATH
    monkeypatch.setattr(sys, "executable", "/nonexistent/bin/python3")  # nor beside the interpreter
    problem = HorovodBackend().check_available()
    assert problem is not None and "scripts/install_horovod.sh" in problem


def test_runners_beside_the_interpreter_come_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A venv that is not activated: its horovodrun/mpirun are used, not the PATH's (or none)."""
    from launcher.backends import find_runner, runner

    (tmp_path / "python3").touch()
    for name in ("horovodrun", "mpirun"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert runner("mpirun", str(tmp_path / "python3")) == str(tmp_path / "mpirun")
    assert find_runner("horovodrun", str(tmp_path / "python3")) == str(tmp_path / "horovodrun")
    assert runner("mpirun", "/nonexistent/bin/python3") == "mpirun"  # else PATH, at start
