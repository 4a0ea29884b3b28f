"""Fault tolerance with real processes and real signals: restarts, SIGTERM, crashes mid-save, full disks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    assert_bitwise_equal,
    finish,
    newest_weights,
    rank_pids,
    run_processes,
    seen_samples,
    start,
    wait_for,
)

from workers.data.sampler import ResumableSampler

QUIET = ["trainer.log_every=50", "trainer.eval_every=100000"]


def start_training(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a 2-rank run without periodic checkpoints and return once both ranks are training."""
    proc = start(run_dir, *QUIET, "trainer.checkpoint_every=100000", *args, env=env)
    wait_for(lambda: len(rank_pids(run_dir)) == 2 and (run_dir / "tb").exists())
    time.sleep(2)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 1500-step run."""
    run_dir = tmp_path_factory.mktemp("reference")
    code, out, err = finish(start(run_dir, *QUIET, "trainer.max_steps=1500", "trainer.checkpoint_every=100"))
    assert code == 0, err[-2000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchrun", pytest.param("mpi", marks=pytest.mark.mpi)])
def test_killed_rank_restarts_from_checkpoint(tmp_path: Path, reference: Path, backend: str) -> None:
    if backend == "mpi" and shutil.which("mpirun") is None:
        pytest.skip("needs mpirun: bash scripts/setup.sh --test")
    proc = start(tmp_path, "--backend", backend, "--max-restarts", "1", *QUIET, "trainer.max_steps=1500",
                 "trainer.checkpoint_every=100")
    wait_for(lambda: (tmp_path / "checkpoints" / "step-00000300.json").exists())
    os.kill(rank_pids(tmp_path)[1], signal.SIGKILL)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    assert "resuming from step" in out
    assert_bitwise_equal(newest_weights(tmp_path), newest_weights(reference))
    assert not run_processes(tmp_path)


@pytest.mark.slow
def test_sigterm_checkpoints_current_step_and_exits_143(tmp_path: Path) -> None:
    proc = start_training(tmp_path, "trainer.max_steps=1000000")
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=60)
    assert code == 143
    steps = [int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*.json")]
    assert len(steps) == 1 and steps[0] > 0  # only the stop checkpoint: checkpoint_every is never reached
    assert f"stopping on request at step {steps[0]}" in out
    time.sleep(0.5)
    assert not run_processes(tmp_path)


@pytest.mark.slow
def test_kill_rank0_mid_save_keeps_previous_checkpoint(tmp_path: Path, reference: Path) -> None:
    common = [*QUIET, "trainer.max_steps=1500", "trainer.checkpoint_every=100"]
    # the hook slows every write() of a checkpoint file; each save takes seconds, so the kill lands mid-write
    proc = start(tmp_path, *common, env={"LAUNCHER_TEST_SLOW_SAVE_S": "0.05"})
    ckpts = tmp_path / "checkpoints"
    wait_for(lambda: (ckpts / "step-00000100.json").exists() and list(ckpts.glob(".step-00000200.pt.*.tmp")))
    os.kill(rank_pids(tmp_path)[0], signal.SIGKILL)
    code, _, err = finish(proc)
    assert code != 0 and "rank 0 failed" in err
    assert [p.name for p in sorted(ckpts.glob("step-*"))] == ["step-00000100.json", "step-00000100.pt"]
    code, out, err = finish(start(tmp_path, *common))
    assert code == 0, err[-3000:]
    assert "resuming from step 100" in out
    assert_bitwise_equal(newest_weights(tmp_path), newest_weights(reference))


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back(tmp_path: Path, reference: Path) -> None:
    common = [*QUIET, "trainer.checkpoint_every=100"]
    assert finish(start(tmp_path, *common, "trainer.max_steps=300"))[0] == 0
    newest = tmp_path / "checkpoints" / "step-00000300.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    code, out, err = finish(start(tmp_path, *common, "trainer.max_steps=1500"))
    assert code == 0, err[-3000:]
    assert "step-00000300.pt is unusable" in out and "resuming from step 200" in out
    assert_bitwise_equal(newest_weights(tmp_path), newest_weights(reference))


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path: Path) -> None:
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    # a checkpoint of the default model is ~120 kB: room for one, not two
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(ckpts)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code, _, err = finish(start(tmp_path, *QUIET, "trainer.max_steps=300", "trainer.checkpoint_every=100"))
        assert code != 0
        assert "could not write checkpoint" in err and "No space left on device" in err
        assert [p.name for p in sorted(ckpts.glob("step-*"))] == ["step-00000100.json", "step-00000100.pt"]
        from workers.checkpoint import verify

        assert verify(ckpts, 100) is None
    finally:
        subprocess.run(["umount", str(ckpts)], check=False)


@pytest.mark.parametrize(("before", "after"), [(4, 2), (2, 1), (1, 3)])
def test_resume_with_another_world_size_sees_each_sample_once(before: int, after: int) -> None:
    """The epoch position is in global samples, so the union over both world sizes is the epoch, once."""
    dataset = list(range(1000))
    batch, steps_before = 8, 10
    seen = []
    for rank in range(before):
        s = ResumableSampler(dataset, before, rank, seed=3)
        s.set_epoch(5)
        seen += list(s)[: steps_before * batch]
    position = steps_before * batch * before
    for rank in range(after):
        s = ResumableSampler(dataset, after, rank, seed=3)
        s.set_epoch(5, start=position)
        seen += list(s)
    assert len(seen) == len(set(seen))  # nothing twice
    assert len(set(dataset) - set(seen)) < after  # nothing skipped except the drop_last remainder


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchrun", pytest.param("mpi", marks=pytest.mark.mpi),
                                     pytest.param("horovod", marks=pytest.mark.horovod)])
def test_sigusr1_checkpoints_now_and_keeps_training(tmp_path: Path, backend: str) -> None:
    if shutil.which({"torchrun": "torchrun", "mpi": "mpirun", "horovod": "horovodrun"}[backend]) is None:
        pytest.skip(f"needs the {backend} runner: bash scripts/setup.sh --test")
    # 3 ms more a step: the run lasts past the signal (>= 9 s) however fast the machine
    proc = start_training(tmp_path, "--backend", backend, "trainer.max_steps=3000",
                          env={"LAUNCHER_TEST_SLOW_STEP_S": "0.003"})
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: list((tmp_path / "checkpoints").glob("step-*.json")), timeout=30)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    steps = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*.json"))
    assert len(steps) == 2 and 0 < steps[0] < 3000 and steps[1] == 3000  # the USR1 save, then the final one


@pytest.mark.slow
def test_second_sigint_kills_at_once(tmp_path: Path) -> None:
    # a save that takes minutes: the first Ctrl-C waits for it, the second must not
    proc = start(tmp_path, *QUIET, "trainer.max_steps=1000000", "trainer.checkpoint_every=100000",
                 env={"LAUNCHER_TEST_SLOW_SAVE_S": "5"})
    wait_for(lambda: len(rank_pids(tmp_path)) == 2 and (tmp_path / "tb").exists())
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    wait_for(lambda: list((tmp_path / "checkpoints").glob(".step-*.tmp")), timeout=30)  # stop-save under way
    proc.send_signal(signal.SIGINT)
    code, _, _ = finish(proc, timeout=20)
    assert code == 130
    time.sleep(0.5)
    assert not run_processes(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after", "steps_before", "steps_after"), [(4, 2, 5, 17), (2, 1, 10, 34)])
def test_resume_on_another_world_size_trains_each_sample_once(
    tmp_path: Path, before: int, after: int, steps_before: int, steps_after: int
) -> None:
    # digits train split: 1437 samples, batch 32; steps_after ends exactly at the end of epoch 0
    logs = tmp_path / "samples"
    logs.mkdir()
    hook = {"LAUNCHER_TEST_SAMPLE_LOG": str(logs)}
    common = [*QUIET, f"trainer.checkpoint_every={steps_before}"]
    run_dir = tmp_path / "run"
    code, _, err = finish(start(run_dir, *common, f"trainer.max_steps={steps_before}", gpus=before, env=hook))
    assert code == 0, err[-2000:]
    code, out, err = finish(start(run_dir, *common, f"trainer.max_steps={steps_after}", gpus=after, env=hook))
    assert code == 0, err[-2000:]
    assert f"resuming from step {steps_before}" in out
    seen = seen_samples(logs)
    assert {e for e, _ in seen} == {0}
    indices = [i for _, i in seen]
    assert len(indices) == len(set(indices)), "a sample was trained twice in the epoch"
    missing = set(range(1437)) - set(indices)
    assert len(missing) < 32 * after + before, f"{len(missing)} samples skipped (more than drop_last explains)"
