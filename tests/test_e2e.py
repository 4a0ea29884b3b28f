"""End to end through `python -m launcher` with real torchrun and gloo ranks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import assert_bitwise_equal, finish, launch, newest_weights, run_processes, scalars, start

pytestmark = pytest.mark.slow
QUIET = ["trainer.eval_every=100000"]


def test_default_job_trains_digits(tmp_path: Path) -> None:
    out, _ = launch(tmp_path)
    assert "no CUDA device found: running 2 CPU rank(s) per node on gloo" in out
    assert "[rank0]:" in out and "[rank0]:step 500: test accuracy" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 500 and result["test/accuracy"] >= 0.95
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == [f"step-{s:08d}.{ext}" for s in (300, 400, 500) for ext in ("json", "pt")]  # keep 3
    losses = scalars(tmp_path, "train/loss")
    assert len(losses) == 50 and losses[-1][1] < losses[0][1] / 5
    assert len(scalars(tmp_path, "lr")) == 500
    for tag in ("test/accuracy", "perf/samples_per_s", "train/grad_norm"):
        assert scalars(tmp_path, tag)
    assert (tmp_path / "config.yaml").read_text().startswith("model:")
    assert json.loads((tmp_path / "plan.json").read_text())["world_size"] == 2
    assert len(list((tmp_path / "logs").glob("*/attempt_0/*/stdout.log"))) == 2  # per-rank logs


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    common = [*QUIET, "trainer.log_every=1", "trainer.checkpoint_every=20"]
    launch(tmp_path / "full", *common, "trainer.max_steps=80")
    launch(tmp_path / "split", *common, "trainer.max_steps=40")
    out, _ = launch(tmp_path / "split", *common, "trainer.max_steps=80")
    assert "resuming from step 40" in out
    assert_bitwise_equal(newest_weights(tmp_path / "split"), newest_weights(tmp_path / "full"))
    steps = [s for s, _ in scalars(tmp_path / "split", "train/loss")]
    assert steps == list(range(1, 81))  # the curve continues, no step twice
    assert scalars(tmp_path / "split", "train/loss") == scalars(tmp_path / "full", "train/loss")


def test_two_identical_runs_give_identical_losses(tmp_path: Path) -> None:
    args = [*QUIET, "trainer.log_every=1", "trainer.max_steps=30", "optimizer=sgd"]
    launch(tmp_path / "a", *args)
    launch(tmp_path / "b", *args)
    a, b = scalars(tmp_path / "a", "train/loss"), scalars(tmp_path / "b", "train/loss")
    assert len(a) == 30 and a == b


def test_grad_accumulation_and_four_ranks_run(tmp_path: Path) -> None:
    launch(tmp_path, *QUIET, "trainer.max_steps=20", "trainer.grad_accum_steps=2", "schedule=cosine", gpus=4)
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 20


FAILING = """
import torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 1:
    raise RuntimeError("rank one gives up")
dist.barrier()
"""


def test_failing_rank_is_reported_and_nothing_is_left(tmp_path: Path) -> None:
    script = tmp_path / "fails_on_rank1.py"
    script.write_text(FAILING)
    code, out, err = finish(start(tmp_path / "run", "--", str(script)))
    assert code != 0
    assert "launcher: rank 1 failed (exit code 1)" in err
    assert "RuntimeError: rank one gives up" in err.split("launcher: rank 1 failed")[1]  # the log tail
    time.sleep(0.5)
    assert not run_processes(script)


TORCHRUN_SCRIPT = """
import os, sys
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
with open(os.path.join(sys.argv[2], os.environ["RANK"]), "w") as f:
    f.write(" ".join(os.environ[k] for k in keys))
"""


def test_unmodified_torchrun_script(tmp_path: Path) -> None:
    script, out_dir = tmp_path / "plain.py", tmp_path / "out"
    script.write_text(TORCHRUN_SCRIPT)
    out_dir.mkdir()
    launch(tmp_path / "run", "--", str(script), "--out", str(out_dir))
    written = {p.name: p.read_text().split() for p in out_dir.iterdir()}
    assert sorted(written) == ["0", "1"]
    for rank, (r, local, world, local_world, addr, port) in written.items():
        assert (r, local, world, local_world) == (rank, rank, "2", "2")
        assert addr and port.isdigit()
    assert written["0"][4:] == written["1"][4:]


def test_no_resume_moves_old_state_aside(tmp_path: Path) -> None:
    launch(tmp_path, *QUIET, "trainer.max_steps=20", "trainer.checkpoint_every=10")
    out, _ = launch(tmp_path, "--no-resume", *QUIET, "trainer.max_steps=10", "trainer.checkpoint_every=10")
    assert "resuming" not in out and "moved earlier checkpoints, tb" in out
    [aside] = (tmp_path / "previous").iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").glob("*.pt")) == ["step-00000010.pt", "step-00000020.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["step-00000010.pt"]


def test_gpt_on_a_token_file(tmp_path: Path) -> None:
    """The lm path: a uint16 token file read with numpy.memmap, a GPT decoder, tokens/s logged."""
    import numpy as np

    tokens = tmp_path / "train.bin"
    np.tile(np.arange(64, dtype=np.uint16), 400).tofile(tokens)  # a cycle: each token predicts the next
    args = ["model=gpt", "model.width=32", "data=tokens", f"data.path={tokens}", "data.context=16",
            "data.vocab_size=64", "data.test_fraction=0.1", "trainer.max_steps=80", "trainer.log_every=20"]
    launch(tmp_path / "run", *args)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["test/accuracy"] > 0.9  # a deterministic cycle is learnable in a few steps
    assert scalars(tmp_path / "run", "perf/tokens_per_s")
