"""End to end through `python -m launcher` with real torchrun and gloo ranks (2 CPU ranks unless said)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import (
    assert_bitwise_equal,
    finish,
    launch,
    leftover_processes,
    newest_checkpoint,
    newest_weights,
    run_launcher,
    start,
    tb_scalars,
)

from launcher.cli import free_port, main

pytestmark = pytest.mark.slow
QUIET = ["trainer.eval_every=100000"]  # no mid-run evaluations: only the final one


def test_default_job_trains_digits(tmp_path: Path) -> None:
    out, _ = launch(tmp_path)  # default config: 500 steps of the digits MLP
    assert "launcher: no CUDA device found: running 2 CPU rank(s) per node on gloo" in out.splitlines()
    rank_lines = [ln for ln in out.splitlines() if ln.startswith("[rank")]
    assert rank_lines and {ln.split(":", 1)[0] for ln in rank_lines} <= {"[rank0]", "[rank1]"}
    assert "[rank0]:step 500: test accuracy" in out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["step"] == 500 and result["test/accuracy"] >= 0.95
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == [f"step-{s:08d}.{ext}" for s in (300, 400, 500) for ext in ("json", "pt")]  # keep 3
    from workers.checkpoint import verify

    assert all(verify(tmp_path / "checkpoints", s) is None for s in (300, 400, 500))  # manifests match the files
    tb = tb_scalars(tmp_path)
    losses = tb["train/loss"]
    assert [s for s, _ in losses] == list(range(10, 501, 10))  # log_every=10
    assert losses[-1][1] < losses[0][1] / 5
    assert [s for s, _ in tb["lr"]] == list(range(10, 501, 10))  # at log steps, like every scalar of the loop
    for tag in ("test/accuracy", "perf/samples_per_s", "train/grad_norm"):
        assert tb[tag]
    assert (tmp_path / "config.yaml").read_text().startswith("model:")
    assert json.loads((tmp_path / "plan.json").read_text())["world_size"] == 2
    assert len(list((tmp_path / "logs").glob("*/attempt_0/*/stdout.log"))) == 2  # per-rank logs
    assert leftover_processes(tmp_path) == []


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    common = [*QUIET, "trainer.log_every=1", "trainer.checkpoint_every=20"]
    launch(tmp_path / "full", *common, "trainer.max_steps=80")
    first, _ = launch(tmp_path / "split", *common, "trainer.max_steps=40")
    assert "resuming" not in first
    assert newest_checkpoint(tmp_path / "split").name == "step-00000040.pt"
    out, _ = launch(tmp_path / "split", *common, "trainer.max_steps=80")
    assert "resuming from step 40" in out
    assert newest_checkpoint(tmp_path / "split").name == newest_checkpoint(tmp_path / "full").name
    assert_bitwise_equal(newest_weights(tmp_path / "split"), newest_weights(tmp_path / "full"))
    split, full = (torch.load(newest_checkpoint(tmp_path / d), weights_only=True)["optimizer"]["state"]
                   for d in ("split", "full"))
    assert split.keys() == full.keys()
    for key in full:
        assert_bitwise_equal(split[key], full[key])  # Adam's moments too, not just the weights
    steps = [s for s, _ in tb_scalars(tmp_path / "split")["train/loss"]]
    assert steps == list(range(1, 81))  # the curve continues: no step twice, none missing
    assert tb_scalars(tmp_path / "split")["train/loss"] == tb_scalars(tmp_path / "full")["train/loss"]


def test_two_identical_runs_give_identical_losses(tmp_path: Path) -> None:
    args = [*QUIET, "trainer.log_every=1", "trainer.max_steps=30", "optimizer=sgd"]
    launch(tmp_path / "a", *args)
    launch(tmp_path / "b", *args)
    a, b = tb_scalars(tmp_path / "a"), tb_scalars(tmp_path / "b")
    assert len(a["train/loss"]) == 30 and a["train/loss"] == b["train/loss"]
    assert a["train/grad_norm"] == b["train/grad_norm"]
    assert len({v for _, v in a["train/loss"]}) > 1  # the series moves: equal because deterministic, not constant


def test_grad_accumulation_and_four_ranks_run(tmp_path: Path) -> None:
    launch(tmp_path, *QUIET, "trainer.max_steps=20", "trainer.grad_accum_steps=2", "schedule=cosine",
           "schedule.warmup_steps=5", "trainer.log_lr_every_step=true", gpus=4)
    assert json.loads((tmp_path / "result.json").read_text())["step"] == 20
    from workers.config import load
    from workers.optim import lr_at

    cfg = load(tmp_path / "config.yaml")  # the schedule, step by step (asked for: every step's lr)
    expected = [(s, lr_at(s - 1, cfg.optimizer["lr"], cfg.schedule, 20)) for s in range(1, 21)]
    assert tb_scalars(tmp_path)["lr"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in expected]


FAILING = """
import sys
import torch.distributed as dist
dist.init_process_group("gloo")  # the torchrun env contract: MASTER_ADDR/PORT, RANK, WORLD_SIZE
dist.barrier()
if dist.get_rank() == 1:
    print("rank 1 is about to fail", file=sys.stderr, flush=True)
    raise RuntimeError("rank one gives up")
dist.barrier()  # rank 0 waits here for a peer that is gone: the launcher must still end it
"""


def test_failing_rank_is_reported_and_nothing_is_left(tmp_path: Path) -> None:
    script, run_dir = tmp_path / "fails_on_rank1.py", tmp_path / "run"
    script.write_text(FAILING)
    proc = run_launcher(["--gpus", "2", "--run-dir", str(run_dir), "--", str(script)])
    assert proc.returncode != 0
    assert "launcher: rank 1 failed (exit code 1)" in proc.stderr
    tail = proc.stderr.split("launcher: rank 1 failed", 1)[1]
    assert "RuntimeError: rank one gives up" in tail  # the tail of rank 1's own log
    assert "rank 1 is about to fail" in tail
    assert leftover_processes(script) == [] and leftover_processes(run_dir) == []


TORCHRUN_SCRIPT = """
import argparse, os
parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
with open(os.path.join(args.out, os.environ["RANK"]), "w") as f:
    f.write(" ".join(os.environ[k] for k in keys))
print(f"wrote {os.environ['RANK']}", flush=True)  # one write: torchrun may split a line between writes
"""


def _check_rank_files(out_dir: Path) -> None:
    written = {p.name: p.read_text().split() for p in out_dir.iterdir()}
    assert sorted(written) == ["0", "1"]
    for rank, (r, local, world, local_world, addr, port) in written.items():
        assert (r, local, world, local_world) == (rank, rank, "2", "2")
        assert addr and port.isdigit() and 0 < int(port) < 65536
    assert written["0"][4:] == written["1"][4:]  # one rendezvous: same MASTER_ADDR and MASTER_PORT


def test_unmodified_torchrun_script(tmp_path: Path) -> None:
    script, out_dir = tmp_path / "plain.py", tmp_path / "out"
    script.write_text(TORCHRUN_SCRIPT)
    out_dir.mkdir()
    out, _ = launch(tmp_path / "run", "--", str(script), "--out", str(out_dir))
    _check_rank_files(out_dir)
    assert "[rank0]:wrote 0" in out and "[rank1]:wrote 1" in out


def test_in_process_main_streams_rank_output_to_the_callers_stdout(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`launcher.cli.main([...])` in-process: exit code returned, the ranks' lines reach sys.stdout *now*.

    BUG: Supervisor.__init__(..., out=sys.stdout) binds the default at import time (launcher/supervise/supervisor.py),
    so rank output goes to whatever sys.stdout was when launcher.supervise.supervisor was first imported, not to the
    caller's current sys.stdout (capsys, contextlib.redirect_stdout), while the launcher's own lines do."""
    script, out_dir = tmp_path / "plain.py", tmp_path / "out"
    script.write_text(TORCHRUN_SCRIPT)
    out_dir.mkdir()
    code = main(["--gpus", "2", "--run-dir", str(tmp_path / "run"), "--", str(script), "--out", str(out_dir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    _check_rank_files(out_dir)
    assert leftover_processes(script) == []
    assert "launcher: starting" in out
    assert "[rank0]:wrote 0" in out and "[rank1]:wrote 1" in out, out[-2000:]


@dataclass(frozen=True)
class Shape:
    """A job shape, run on this machine: ``nodes`` launchers (one per simulated node), ``nproc`` ranks each."""

    name: str
    nproc: int
    nodes: int = 1
    timeout: float = 180.0
    requires_gpu: bool = False


SHAPES = [  # 1 node x 2 CPU ranks: test_unmodified_torchrun_script
    Shape("cpu-1x4", nproc=4),
    Shape("cpu-2x1", nproc=1, nodes=2),  # two launchers meet at node 0's rendezvous, as on two machines
    Shape("cuda-1x2", nproc=2, requires_gpu=True),
    Shape("cuda-2x2", nproc=2, nodes=2, requires_gpu=True),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_job_shapes_give_torchrun_env(tmp_path: Path, shape: Shape) -> None:
    if shape.requires_gpu and torch.cuda.device_count() < shape.nproc:
        pytest.skip(f"needs {shape.nproc} CUDA device(s)")
    script, out_dir = tmp_path / "plain.py", tmp_path / "out"
    script.write_text(TORCHRUN_SCRIPT.replace('"MASTER_PORT")', '"MASTER_PORT", "GROUP_RANK")'))
    out_dir.mkdir()
    flags = ["--nodes", str(shape.nodes), "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    # every node's run dir has the same name: it is the rendezvous id (see test_plan's rendezvous test)
    procs = [start(tmp_path / f"node{n}" / "run", *flags, "--node-rank", str(n), "--", str(script), "--out",
                   str(out_dir), gpus=shape.nproc) for n in range(shape.nodes)]
    results = [_finish_all(procs, shape.timeout, p) for p in procs]
    for code, out, err in results:
        assert code == 0, f"{out[-2000:]}\n{err[-2000:]}"
    world = shape.nodes * shape.nproc
    written = {int(p.name): p.read_text().split() for p in out_dir.iterdir()}
    assert sorted(written) == list(range(world))
    for rank, (r, local, ws, local_ws, _addr, _port, group) in written.items():
        assert (int(r), int(local), int(ws), int(local_ws), int(group)) == (rank, rank % shape.nproc, world,
                                                                           shape.nproc, rank // shape.nproc)
    assert len({tuple(w[4:6]) for w in written.values()}) == 1  # one MASTER_ADDR:MASTER_PORT for all ranks
    assert leftover_processes(script) == []


def _finish_all(procs: list[subprocess.Popen], timeout: float, proc: subprocess.Popen) -> tuple[int, str, str]:
    """finish(proc); if it fails (e.g. a timeout), stop the other nodes' launchers before failing the test."""
    try:
        return finish(proc, timeout)
    except AssertionError:
        for other in procs:
            if other.poll() is None:
                other.terminate()
                other.communicate(timeout=60)
        raise


def test_no_resume_moves_old_state_aside(tmp_path: Path) -> None:
    common = [*QUIET, "trainer.log_every=1", "trainer.checkpoint_every=10"]
    launch(tmp_path, *common, "trainer.max_steps=20")
    old = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    assert sorted(old) == [f"step-{s:08d}.{e}" for s in (10, 20) for e in ("json", "pt")]
    out, _ = launch(tmp_path, "--no-resume", *common, "trainer.max_steps=10")
    assert "resuming" not in out and "moved earlier checkpoints, tb" in out
    [aside] = (tmp_path / "previous").iterdir()
    assert {p.name: p.read_bytes() for p in (aside / "checkpoints").iterdir()} == old  # moved, not touched
    assert list((aside / "tb").iterdir())
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.pt")) == ["step-00000010.pt"]
    assert [s for s, _ in tb_scalars(tmp_path)["train/loss"]] == list(range(1, 11))  # a fresh curve from step 0
    assert torch.load(newest_checkpoint(tmp_path), weights_only=True)["train_state"]["step"] == 10


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
    assert tb_scalars(tmp_path / "run")["perf/tokens_per_s"]

