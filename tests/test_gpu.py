"""The GPU path, on a CUDA machine (marker ``gpu``; every test is skipped without CUDA).

NCCL all-reduce gives gloo's gradients on the same seeds; each rank runs on GPU LOCAL_RANK; bf16 and fp16
(GradScaler) autocast train; the loader pins batches and they arrive on the GPU intact; ``--gpus N+1`` is exit 2;
``python -m bench lm`` reports MFU with the GPU named. ``bash scripts/gpu_check.sh`` runs this tier and the lm and
allreduce benchmarks and keeps their JSON in bench/results/gpu/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_bitwise_equal, finish, newest_checkpoint, run_launcher, start, tb_scalars
from gpu_probe import reference_grads
from torch.utils.data import TensorDataset

from bench.data_suite import Plain

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="needs CUDA: torch.cuda.is_available() is false")]

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
PROBE = ROOT / "tests" / "gpu_probe.py"


def probe(out: Path, ranks: int, cuda: bool, env: dict[str, str] | None = None) -> list[dict]:
    """One DDP step of the probe through the launcher: on GPUs (NCCL), or hidden from CUDA (CPU ranks, gloo)."""
    return probe_run(out, ranks, cuda, env)[0]


def probe_run(out: Path, ranks: int, cuda: bool, env: dict[str, str] | None = None) -> tuple[list[dict], str]:
    """:func:`probe`, and the launcher's stdout + stderr."""
    out.mkdir()
    env = {**(env or {}), **({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})}
    run_dir = out.parent / f"run_{out.name}"
    code, stdout, stderr = finish(start(run_dir, "--", str(PROBE), str(out), gpus=ranks, env=env))
    assert code == 0, f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(ranks)], stdout + stderr


def two_ranks_or_skip(ranks: int) -> None:
    if ranks > GPUS:
        pytest.skip(f"{ranks} ranks need {ranks} GPUs; this machine has {GPUS} (world size 1 is compared instead)")


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_nccl_gradients_match_gloo_on_the_same_seeds(tmp_path: Path, ranks: int) -> None:
    two_ranks_or_skip(ranks)
    nccl, gloo = probe(tmp_path / "nccl", ranks, cuda=True), probe(tmp_path / "gloo", ranks, cuda=False)
    assert {r["backend"] for r in nccl} == {"nccl"} and {r["backend"] for r in gloo} == {"gloo"}
    assert {r["param_device"] for r in gloo} == {"cpu"}
    expected = reference_grads(ranks)  # the mean of every rank's gradients, computed in one process
    for g, n in zip(gloo, nccl, strict=True):
        assert g["grads"].keys() == n["grads"].keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(n["grads"][name], g["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
            torch.testing.assert_close(n["grads"][name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_each_rank_runs_on_gpu_local_rank(tmp_path: Path, ranks: int) -> None:
    two_ranks_or_skip(ranks)
    for r in probe(tmp_path / "where", ranks, cuda=True):
        local = r["env_local_rank"]
        assert r["local_rank"] == r["current_device"] == local, r
        assert r["device"] == r["param_device"] == f"cuda:{local}", r


@pytest.mark.slow
def test_nccl_env_reaches_the_ranks_and_nccl_logs_carry_the_rank_prefix(tmp_path: Path) -> None:
    """A user's NCCL_* settings reach every rank unchanged, NCCL runs a real collective, and what NCCL itself
    prints (from C, not Python) comes out under the launcher's [rankN]: prefix."""
    records, output = probe_run(tmp_path / "nccl_env", 1, cuda=True, env={"NCCL_DEBUG": "INFO"})
    (r,) = records
    assert r["backend"] == "nccl" and r["allreduce"] == [1.0] * 4, r
    assert r["nccl_env"].get("NCCL_DEBUG") == "INFO", r["nccl_env"]
    nccl_lines = [ln for ln in output.splitlines() if "NCCL INFO" in ln]
    assert nccl_lines, output[-3000:]
    assert all(ln.startswith("[rank0]:") for ln in nccl_lines), nccl_lines[:5]


@pytest.mark.slow
def test_resume_on_the_gpu_equals_an_uninterrupted_run_with_dropout(tmp_path: Path) -> None:
    """Dropout draws from the CUDA generator: a run stopped at step 20 and resumed matches one that never
    stopped, weights bitwise, only if the checkpoint carries that generator's state (and the optimizer's
    state loads back onto the GPU)."""
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)}
    common = ["model._target_=gpu_probe.DropoutMLP", "model.inputs=64", "model.hidden=128", "model.classes=10",
              "+model.p=0.3", "trainer.log_every=5", "trainer.eval_every=100000", "trainer.checkpoint_every=20"]

    def run(name: str, steps: int) -> str:
        code, out, err = finish(start(tmp_path / name, *common, f"trainer.max_steps={steps}", gpus=1, env=env))
        assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
        return out

    run("full", 40)
    run("split", 20)
    assert "cuda" in torch.load(newest_checkpoint(tmp_path / "split"), weights_only=True)["rng"]
    assert "resuming from step 20" in run("split", 40)
    full, split = (torch.load(newest_checkpoint(tmp_path / d), weights_only=True) for d in ("full", "split"))
    assert full["rng"]["cuda"].dtype == torch.uint8
    assert_bitwise_equal(split["model"], full["model"])
    assert tb_scalars(tmp_path / "split")["train/loss"] == tb_scalars(tmp_path / "full")["train/loss"]


def trains_with(tmp_path: Path, precision: str, dtype: str) -> Path:
    """The digits task on one GPU in ``precision``, through a model that raises unless it computes in ``dtype``;
    returns the run directory after checking that the loss went down."""
    run_dir = tmp_path / precision
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)}
    code, out, err = finish(start(
        run_dir, f"trainer.precision={precision}", "model._target_=gpu_probe.AutocastMLP", "model.inputs=64",
        "model.hidden=128", "model.classes=10", f"model.dtype={dtype}", "trainer.max_steps=120",
        "trainer.log_every=10", "trainer.eval_every=1000", "trainer.checkpoint_every=1000", gpus=1, env=env))
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    losses = [v for _, v in tb_scalars(run_dir)["train/loss"]]
    assert losses[-1] < 0.5 * losses[0], losses
    return run_dir


@pytest.mark.slow
def test_bf16_autocast_trains(tmp_path: Path) -> None:
    if torch.cuda.get_device_capability(0) < (8, 0):
        pytest.skip(f"{torch.cuda.get_device_name(0)} has no bf16 tensor cores (compute capability < 8.0)")
    state = torch.load(newest_checkpoint(trains_with(tmp_path, "bf16", "bfloat16")), weights_only=True)
    assert "grad_scaler" not in state  # bf16 has fp32's range: no loss scaling
    assert all(t.dtype == torch.float32 for t in state["model"].values())  # autocast leaves fp32 master weights


@pytest.mark.slow
def test_fp16_autocast_trains_with_a_grad_scaler(tmp_path: Path) -> None:
    state = torch.load(newest_checkpoint(trains_with(tmp_path, "fp16", "float16")), weights_only=True)
    assert state["grad_scaler"]["scale"] > 0  # the GradScaler's state is checkpointed


Samples = Plain  # map-style samples: the DataLoader's per-sample path (collate), not TensorDataset's


@pytest.mark.parametrize("kind", ["tensors", "samples"])
@pytest.mark.parametrize("workers", [0, 2])
def test_loader_pins_and_prefetches_batches_onto_the_gpu(kind: str, workers: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.data.loader import TrainLoader, loader_kwargs

    x, y = torch.randn(256, 32), torch.arange(256)
    data = TensorDataset(x, y) if kind == "tensors" else Samples(x, y)
    gpu = torch.device("cuda", 0)
    kw = loader_kwargs({"pin_memory": True, "num_workers": workers}, gpu)
    assert kw["pin_memory"] is True
    assert loader_kwargs({"pin_memory": True, "num_workers": workers}, torch.device("cpu"))["pin_memory"] is False
    copies = []  # (source page-locked?, non_blocking?) of every host-to-GPU copy the loader makes
    to = torch.Tensor.to

    def spy(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type == "cuda":
            copies.append((self.is_pinned(), bool(kwargs.get("non_blocking"))))
        return out

    loader = TrainLoader(data, 16, 1, 0, 0, gpu, kw)
    on_cpu = TrainLoader(data, 16, 1, 0, 0, torch.device("cpu"), loader_kwargs({}, torch.device("cpu")))
    monkeypatch.setattr(torch.Tensor, "to", spy)
    # 40 batches: across epoch boundaries (16 an epoch), each copy queued while the previous ones may be in flight
    batches = [b for b, _ in zip(loader, range(40), strict=False)]
    monkeypatch.undo()
    assert len(copies) >= 2 * 40 and all(pinned and non_blocking for pinned, non_blocking in copies), copies[:4]
    torch.cuda.synchronize()
    for (gx, gy), (cx, cy), _ in zip(batches, on_cpu, range(40), strict=False):
        assert gx.device == gy.device == gpu
        assert torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)
    loader.close()


def test_more_gpus_than_exist_is_exit_2_with_one_line_and_no_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_launcher(["--gpus", str(GPUS + 1), "--run-dir", str(run_dir)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("launcher: error:") and f"HINT: --gpus {GPUS}" in lines[0], proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_bench_lm_reports_mfu_and_names_the_gpu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "lm", "--tiny", "--repeats", "1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "lm.json").read_text())
    assert record["device"] == torch.cuda.get_device_name(0)
    assert record["ranks"] == GPUS
    assert record["precision"] == ("bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16")
    assert record["peak_flops_per_rank"] > 1e12 and record["peak_source"]
    assert record["mfu"] and all(0 < v < 1 for v in record["mfu"].values()), record["mfu"]
    assert all(v["median"] > 0 for v in record["tokens_per_s"].values())
