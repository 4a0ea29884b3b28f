"""The benchmark suites. Each returns (payload for JSON, plot function, printable table)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT, Stat, bar_plot, interleaved, launch, scalars, steady_rate, table

Result = tuple[dict[str, object], Callable[[Path], None], str]


def _trainer_args(steps: int, interval: int, batch: int = 64) -> list[str]:
    # no clipping: the hand-written baseline loop has none, and the comparison is of the same work
    return ["data=synthetic", f"data.batch_size={batch}", f"trainer.max_steps={steps}", "trainer.grad_clip=0",
            f"trainer.log_every={interval}", "trainer.eval_every=1000000", "trainer.checkpoint_every=1000000",
            "trainer.threads=1"]


def overhead(repeats: int, tiny: bool) -> Result:
    """Launcher + built-in trainer vs bare torchrun + a minimal loop: steps/s and time to first step."""
    steps, interval = (60, 20) if tiny else (3000, 250)
    first: dict[str, list[float]] = {"launcher": [], "torchrun": []}

    def via_launcher() -> float:
        with tempfile.TemporaryDirectory() as d:
            start = launch(Path(d), "--gpus", "2", *_trainer_args(steps, interval))
            first["launcher"].append(scalars(Path(d), "lr")[0][2] - start)
            return steady_rate(Path(d))

    def via_torchrun() -> float:
        start = time.time()
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(ROOT / "bench" / "minimal_ddp.py"), str(steps), str(interval), "64"],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if not lines:  # the measurement is printed before teardown; only its absence is a failure
            raise RuntimeError(f"minimal_ddp.py printed no result: {out.stderr[-2000:]}")
        record = json.loads(lines[-1])
        first["torchrun"].append(record["first_step_time"] - start)
        return record["samples_per_s"]

    stats = interleaved({"launcher": via_launcher, "torchrun": via_torchrun}, repeats)
    ttfs = {k: Stat.of(v) for k, v in first.items()}
    ratio = stats["launcher"].median / stats["torchrun"].median
    ttfs_ratio = ttfs["launcher"].median / ttfs["torchrun"].median
    payload = {"samples_per_s": {k: v.as_dict() for k, v in stats.items()},
               "time_to_first_step_s": {k: v.as_dict() for k, v in ttfs.items()},
               "ratio_steps_per_s": ratio, "goal_ratio_steps_per_s": 0.99,
               "ratio_time_to_first_step": ttfs_ratio, "goal_ratio_time_to_first_step": 1.10,
               "config": {"ranks": 2, "steps": steps, "batch_per_rank": 64, "threads_per_rank": 1}}
    rows = [(k, stats[k].median, stats[k].lo, stats[k].hi, ttfs[k].median) for k in stats]
    text = table(rows, ("runner", "samples/s", "min", "max", "first step s"))
    text += f"\nratio launcher/torchrun steps/s: {ratio:.3f} (goal >= 0.99)"
    text += f"\nratio time to first step: {ttfs_ratio:.3f} (goal <= 1.10)"
    return payload, lambda p: bar_plot(p, "overhead: samples/s (2 CPU ranks)", stats, "samples/s"), text


def backends(repeats: int, tiny: bool) -> Result:
    """torchrun vs horovod vs mpi backends, same model and data: samples/s ratios to torchrun."""
    import importlib.util
    import shutil

    steps, interval = (60, 20) if tiny else (2000, 250)
    names = ["torchrun"]
    if importlib.util.find_spec("mpi4py") and shutil.which("mpirun"):
        names.append("mpi")
    if importlib.util.find_spec("horovod") and shutil.which("horovodrun"):
        names.append("horovod")

    def measure(backend: str) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as d:
                launch(Path(d), "--gpus", "2", "--backend", backend, *_trainer_args(steps, interval))
                return steady_rate(Path(d))
        return run

    stats = interleaved({b: measure(b) for b in names}, repeats)
    ratios = {b: stats[b].median / stats["torchrun"].median for b in names}
    payload = {"samples_per_s": {k: v.as_dict() for k, v in stats.items()}, "ratio_to_torchrun": ratios,
               "goal_horovod_ratio": 0.95, "config": {"ranks": 2, "steps": steps, "threads_per_rank": 1}}
    text = table([(b, stats[b].median, stats[b].lo, stats[b].hi, ratios[b]) for b in names],
                 ("backend", "samples/s", "min", "max", "ratio"))
    return payload, lambda p: bar_plot(p, "backends: samples/s (2 CPU ranks)", stats, "samples/s"), text


def scaling(repeats: int, tiny: bool) -> Result:
    """1 and 2 ranks (more where there are cores) at a fixed per-rank batch, 1 thread per rank."""
    steps, interval = (60, 20) if tiny else (2000, 250)
    sizes = [n for n in (1, 2, 4, 8) if n <= max(2, os.cpu_count() or 1)]

    def measure(n: int) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as d:
                launch(Path(d), "--gpus", str(n), *_trainer_args(steps, interval))
                return steady_rate(Path(d))
        return run

    stats = interleaved({f"{n} ranks": measure(n) for n in sizes}, repeats)
    base = stats["1 ranks"].median
    eff = {k: stats[k].median / (base * int(k.split()[0])) for k in stats}
    payload = {"samples_per_s": {k: v.as_dict() for k, v in stats.items()}, "efficiency": eff,
               "note": f"1 thread per rank on a {os.cpu_count()}-core machine",
               "config": {"steps": steps, "batch_per_rank": 64}}
    text = table([(k, stats[k].median, stats[k].lo, stats[k].hi, eff[k]) for k in stats],
                 ("ranks", "samples/s", "min", "max", "efficiency"))
    return payload, lambda p: bar_plot(p, "scaling: samples/s, 1 thread per rank", stats, "samples/s"), text


def allreduce(repeats: int, tiny: bool) -> Result:
    """All-reduce bus bandwidth over message sizes through the trainer's process group (gloo/NCCL)."""
    top = 1 << 20 if tiny else 256 << 20
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "bench.allreduce_probe", str(top), str(repeats)], cwd=ROOT,
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    record = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [(r["bytes"], r["time_s"], r["algbw_GBps"], r["busbw_GBps"]) for r in record["sizes"]]
    text = table(rows, ("bytes", "time s", "algbw GB/s", "busbw GB/s"))
    text += f"\nmemcpy bandwidth (local limit): {record['memcpy_GBps']:.2f} GB/s; backend {record['backend']}"

    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.semilogx([r[0] for r in rows], [r[3] for r in rows], "o-", label="busbw")
        ax.axhline(record["memcpy_GBps"], color="gray", ls="--", label="memcpy")
        ax.set_xlabel("message bytes")
        ax.set_ylabel("GB/s")
        ax.set_title(f"allreduce bus bandwidth ({record['backend']}, 2 ranks)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    return record, plot, text


def checkpoint(repeats: int, tiny: bool) -> Result:
    """Training stall per checkpoint save, sync vs async, for >= 100 MB of state."""
    import torch

    from workers.checkpoint import CheckpointManager
    from workers.dist.ddp import SingleProcessComm
    from workers.dist.env import DistEnv

    n = 512 if tiny else 5120  # 5120^2 floats = 105 MB
    state = {"model": {"w": torch.randn(n, n)}, "step": 0}
    comm = SingleProcessComm(DistEnv())
    with tempfile.TemporaryDirectory() as d:
        managers = {mode: CheckpointManager(Path(d) / mode, comm, every=1, keep=1, meta={},
                                            async_save=mode == "async") for mode in ("sync", "async")}
        step = iter(range(1, 10_000))

        def stall(mode: str) -> Callable[[], float]:
            def run() -> float:
                manager = managers[mode]
                value = manager.save(next(step), last_step=False, state=lambda: state)
                manager.wait()  # the next round starts with nothing in flight
                return value or 0.0
            return run

        stats = interleaved({m: stall(m) for m in managers}, repeats)
    size_mb = n * n * 4 / 1e6
    ratio = stats["async"].median / stats["sync"].median
    payload = {"stall_s": {k: v.as_dict() for k, v in stats.items()}, "state_mb": size_mb,
               "ratio_async_to_sync": ratio, "goal_ratio": 0.10}
    text = table([(k, stats[k].median * 1e3, stats[k].lo * 1e3, stats[k].hi * 1e3) for k in stats],
                 ("save", "stall ms", "min", "max"))
    text += f"\nstate {size_mb:.0f} MB; async/sync stall ratio {ratio:.3f} (goal <= 0.10)"
    stats_ms = {k: Stat.of([x * 1e3 for x in v.runs]) for k, v in stats.items()}
    return payload, lambda p: bar_plot(p, f"checkpoint stall, {size_mb:.0f} MB state", stats_ms, "ms"), text


# dense peak FLOP/s per device for MFU (bf16 tensor cores on GPUs); the CPU's is measured
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "V100": 125e12}


def device_peak(threads: int = 1) -> tuple[str, float]:
    """(device name, peak FLOP/s of one rank): from the table on CUDA, a float32 matmul probe on CPU."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return name, next((v for k, v in PEAK_FLOPS.items() if k in name), 312e12)
    torch.set_num_threads(threads)
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return f"cpu ({threads} thread)", 5 * 2 * n**3 / (time.perf_counter() - start)


def lm(repeats: int, tiny: bool) -> Result:
    """GPT-style decoder through the launcher: tokens/s and MFU per DDP setting; which was fastest."""
    from workers.models.gpt import GPT, flops_per_token

    steps, interval = (12, 4) if tiny else (120, 20)
    shape = {"model.layers": 2, "model.heads": 4, "model.width": 128, "data.context": 128, "data.vocab_size": 512}
    if tiny:
        shape = {**shape, "model.width": 32, "data.context": 32}
    args = ["model=gpt", "data=synthetic_tokens", *(f"{k}={v}" for k, v in shape.items()), "data.batch_size=8",
            f"trainer.max_steps={steps}", f"trainer.log_every={interval}", "trainer.eval_every=1000000",
            "trainer.checkpoint_every=1000000", "trainer.threads=1"]
    import torch

    if torch.cuda.is_available():  # same suite on GPUs: bf16 autocast, NCCL (chosen by the trainer)
        args.append("trainer.precision=bf16")
    variants = {"default": [], "bucket_1mb": ["ddp.bucket_cap_mb=1"],
                "grad_as_bucket_view": ["ddp.gradient_as_bucket_view=true"],
                "static_graph": ["ddp.static_graph=true"], "compile": ["trainer.compile=true"]}
    if tiny:
        variants = {k: variants[k] for k in ("default", "static_graph")}

    def measure(extra: list[str]) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as d:
                launch(Path(d), "--gpus", "2", *args, *extra)
                rates = [v for _, v, _ in scalars(Path(d), "perf/tokens_per_s")][1:]
                return sorted(rates)[len(rates) // 2]
        return run

    stats = interleaved({name: measure(extra) for name, extra in variants.items()}, repeats)
    model = GPT(shape["data.vocab_size"], shape["data.context"], shape["model.layers"], shape["model.heads"],
                shape["model.width"])
    fpt = flops_per_token(model)
    device, peak = device_peak()
    mfu = {k: v.median * fpt / (peak * 2) for k, v in stats.items()}
    fastest = max(stats, key=lambda k: stats[k].median)
    payload = {"tokens_per_s": {k: v.as_dict() for k, v in stats.items()}, "mfu": mfu, "fastest": fastest,
               "flops_per_token": fpt, "device": device, "peak_flops_per_rank": peak, "ranks": 2,
               "shape": shape}
    text = table([(k, stats[k].median, stats[k].lo, stats[k].hi, mfu[k]) for k in stats],
                 ("setting", "tokens/s", "min", "max", "MFU"))
    text += f"\nfastest here: {fastest}; {fpt} FLOPs/token; peak per rank {peak / 1e9:.1f} GFLOP/s ({device})"
    return payload, lambda p: bar_plot(p, f"lm: tokens/s per DDP setting ({device})", stats, "tokens/s"), text


SUITES: dict[str, Callable[[int, bool], Result]] = {
    "overhead": overhead, "backends": backends, "scaling": scaling, "allreduce": allreduce, "checkpoint": checkpoint,
    "lm": lm,
}
