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

from bench.common import (
    BARE,
    ROOT,
    Stat,
    bar_plot,
    bare_run,
    interleaved,
    launch,
    pair_plot,
    scalars,
    steady_rate,
    table,
)

Result = tuple[dict[str, object], Callable[[Path], None], str]


def _trainer_args(steps: int, interval: int, batch: int = 64) -> list[str]:
    # no clipping: the hand-written baseline loop has none, and the comparison is of the same work
    return ["data=synthetic", f"data.batch_size={batch}", f"trainer.max_steps={steps}", "trainer.grad_clip=0",
            f"trainer.log_every={interval}", "trainer.eval_every=1000000", "trainer.checkpoint_every=1000000",
            "trainer.threads=1"]


def overhead(repeats: int, tiny: bool) -> Result:
    """Launcher + built-in trainer vs bare torchrun + a minimal loop: samples/s, the per-step overhead, time to first
    step (the end of rank 0's first step, both sides); the launcher's start-up by phase; a profile of the steps."""
    from bench import overhead_detail as detail
    from bench.data_suite import Neighbours

    steps, interval, batch, ranks = (60, 20, 64, 2) if tiny else (3000, 250, 64, 2)
    args = ["--gpus", str(ranks), *_trainer_args(steps, interval, batch)]
    first: dict[str, list[float]] = {"launcher": [], "torchrun": []}
    splits: list[dict[str, float]] = []

    def via_launcher() -> float:
        with tempfile.TemporaryDirectory() as d:
            start = launch(Path(d), *args)
            first["launcher"].append(detail.first_step_at(Path(d)) - start)
            splits.append(detail.startup_split(Path(d), start))
            return steady_rate(Path(d))

    def via_torchrun() -> float:
        start = time.time()
        record = bare_run("torchrun", steps, interval, batch)
        first["torchrun"].append(record["first_step_time"] - start)
        return record["samples_per_s"]

    # the machine is shared: how much of its CPU other processes took during each measurement
    busy = {"launcher": Neighbours(), "torchrun": Neighbours()}
    rounds = detail.alternating({"launcher": busy["launcher"].measure(via_launcher),
                                 "torchrun": busy["torchrun"].measure(via_torchrun)}, repeats)
    stats = {k: Stat.of(v) for k, v in rounds.items()}
    ttfs = {k: Stat.of(v) for k, v in first.items()}
    ratio = stats["launcher"].median / stats["torchrun"].median
    ttfs_ratio = ttfs["launcher"].median / ttfs["torchrun"].median
    # each round's own ratio too: side by side in time, so load that drifts between rounds cancels
    paired = [a / b for a, b in zip(rounds["launcher"], rounds["torchrun"], strict=True)]
    paired_ttfs = [a / b for a, b in zip(first["launcher"], first["torchrun"], strict=True)]
    samples_per_step = batch * ranks
    bare_step_us = samples_per_step / stats["torchrun"].median * 1e6
    step_overhead_us = samples_per_step / stats["launcher"].median * 1e6 - bare_step_us
    split = {phase: Stat.of([s[phase] for s in splits]) for phase in detail.PHASES}
    with tempfile.TemporaryDirectory() as d:
        profile = detail.profile(detail.profile_run(Path(d), args), steps)
    with tempfile.TemporaryDirectory() as d:  # the loop's own cost per step, without the noise between runs
        same = detail.interleaved_run(Path(d), ["--gpus", "1", *_trainer_args(steps, interval, batch)], interval)
    # a fixed cost per step (Python, not the all-reduce): what it takes off the two-rank bare step above
    from_step_cost = bare_step_us / (bare_step_us + same["step_overhead_us"])
    payload = {"samples_per_s": {k: v.as_dict() for k, v in stats.items()},
               "time_to_first_step_s": {k: v.as_dict() for k, v in ttfs.items()},
               "ratio_steps_per_s": ratio, "goal_ratio_steps_per_s": 0.99,
               "ratio_time_to_first_step": ttfs_ratio, "goal_ratio_time_to_first_step": 1.10,
               "goals": {"ratio_steps_per_s": ">= 0.99", "ratio_steps_per_s_from_step_cost": ">= 0.99",
                         "ratio_time_to_first_step": "<= 1.1"},
               "interleaved_one_rank": same, "ratio_steps_per_s_from_step_cost": from_step_cost,
               "ratio_steps_per_s_by_round": paired, "ratio_time_to_first_step_by_round": paired_ttfs,
               "neighbours_cpu_share": {k: v.shares for k, v in busy.items()},
               "step_overhead_us": step_overhead_us, "bare_step_us": bare_step_us,
               "launcher_startup_s": {k: v.as_dict() for k, v in split.items()},
               "profile": profile,
               "config": {"ranks": ranks, "steps": steps, "batch_per_rank": batch, "threads_per_rank": 1}}
    rows = [(k, stats[k].median, stats[k].lo, stats[k].hi, ttfs[k].median) for k in stats]
    text = table(rows, ("runner", "samples/s", "min", "max", "first step s"))
    text += f"\nratio launcher/torchrun steps/s: {ratio:.3f} (goal >= 0.99); by round: " + \
        ", ".join(f"{r:.3f}" for r in paired)
    text += (f"\nper-step overhead: {step_overhead_us:+.1f} us on a {bare_step_us:.0f} us bare step "
             f"({step_overhead_us / bare_step_us:+.1%}; medians, {samples_per_step} samples a step)")
    text += (f"\nthe loop's own cost (one rank, a minimal step before each trainer step, medians): trainer "
             f"{same['trainer_step_us']:.0f} us (log steps' extra {same['log_step_extra_us']:.0f} us spread over "
             f"{interval}), minimal loop {same['bare_step_us']:.0f} us: {same['step_overhead_us']:+.1f} us a step; "
             f"on the {bare_step_us:.0f} us two-rank bare step: ratio {from_step_cost:.3f} (goal >= 0.99)")
    text += f"\nratio time to first step: {ttfs_ratio:.3f} (goal <= 1.10); by round: " + \
        ", ".join(f"{r:.3f}" for r in paired_ttfs)
    text += "\nCPU share other processes took, by round (launcher / torchrun): " + ", ".join(
        f"{a:.0%} / {b:.0%}" for a, b in zip(busy["launcher"].shares, busy["torchrun"].shares, strict=False))
    text += "\n\n" + detail.startup_text(split) + "\n\n" + detail.profile_text(profile)
    return payload, lambda p: bar_plot(p, "overhead: samples/s (2 CPU ranks)", stats, "samples/s"), text


def backends(repeats: int, tiny: bool) -> Result:
    """Each backend through the launcher vs its bare runner (torchrun, mpirun, horovodrun + a minimal loop)."""
    import importlib.util
    import shutil

    from bench.data_suite import Neighbours

    steps, interval = (60, 20) if tiny else (2000, 250)
    names = ["torchrun"]
    if importlib.util.find_spec("mpi4py") and shutil.which("mpirun"):
        names.append("mpi")
    if importlib.util.find_spec("horovod") and shutil.which("horovodrun"):
        names.append("horovod")

    def via_launcher(backend: str) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as d:
                launch(Path(d), "--gpus", "2", "--backend", backend, *_trainer_args(steps, interval))
                return steady_rate(Path(d))
        return run

    def bare(backend: str) -> Callable[[], float]:
        return lambda: bare_run(backend, steps, interval)["samples_per_s"]

    # each backend right beside its bare runner, in every round; how busy the rest of the machine was, beside
    neighbours = Neighbours()
    measures = {f"{kind} {b}": neighbours.measure(fn(b))
                for b in names for kind, fn in (("launcher", via_launcher), ("bare", bare))}
    stats = interleaved(measures, repeats)
    busy = {name: neighbours.shares[i::len(measures)] for i, name in enumerate(measures)}
    launched = {b: stats[f"launcher {b}"] for b in names}
    anchors = {b: stats[f"bare {b}"] for b in names}
    to_bare = {b: launched[b].median / anchors[b].median for b in names}
    to_torchrun = {b: launched[b].median / launched["torchrun"].median for b in names}
    goal = 0.97  # issue #17: each backend within 3 % of its bare runner
    payload = {"samples_per_s": {b: v.as_dict() for b, v in launched.items()},
               "bare_samples_per_s": {b: v.as_dict() for b, v in anchors.items()},
               "ratio_to_bare": to_bare, "ratio_to_torchrun": to_torchrun,
               "goals": {f"ratio_to_bare.{b}": f">= {goal}" for b in names},
               "bare_commands": {b: " ".join(BARE[b]) + " STEPS INTERVAL BATCH" for b in names},
               "neighbours_cpu_share": busy,  # per measurement, in round order: other processes' share of the CPU
               "config": {"ranks": 2, "steps": steps, "log_every": interval, "batch_per_rank": 64,
                          "threads_per_rank": 1}}
    rows = [(b, launched[b].median, anchors[b].median, f"{launched[b].lo:.0f}-{launched[b].hi:.0f}",
             f"{anchors[b].lo:.0f}-{anchors[b].hi:.0f}", to_bare[b], to_torchrun[b]) for b in names]
    text = table(rows, ("backend", "samples/s", "bare", "min-max", "bare min-max", "to bare", "to torchrun"))
    text += f"\ngoal: each backend >= {goal} of its bare runner; the ratio to torchrun is information"
    if neighbours.shares:
        text += f"\nother processes used up to {max(neighbours.shares):.0%} of the machine's CPU in a measurement"
    pairs = {b: (launched[b], anchors[b]) for b in names}
    notes = {b: f"{to_bare[b]:.2f} of bare" for b in names}
    return payload, lambda p: pair_plot(p, "backends vs their bare runners: samples/s (2 CPU ranks)", pairs,
                                        ("python -m launcher", "bare runner"), "samples/s", notes), text


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
    """All-reduce bus bandwidth over message sizes through the trainer's process group: gloo on 2 CPU ranks;
    NCCL with one rank per GPU on a CUDA machine (all of them, as nccl-tests runs; one GPU has no peers)."""
    import torch

    top = 1 << 20 if tiny else 256 << 20
    ranks = torch.cuda.device_count() if torch.cuda.is_available() else 2
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                          "-m", "bench.allreduce_probe", str(top), str(repeats)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"bench.allreduce_probe failed ({out.returncode}): {out.stderr[-2000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    if record["ranks"] == 1:
        record["note"] = "one GPU: no peers, so bus bandwidth is 0 by definition; algbw is the local all-reduce"
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
        ax.set_title(f"allreduce bus bandwidth ({record['backend']}, {record['ranks']} ranks)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    return record, plot, text


def checkpoint(repeats: int, tiny: bool) -> Result:
    """Training stall per checkpoint save, sync vs async, for >= 100 MB of state (on the GPU where there is one:
    the async snapshot is then a copy to page-locked memory)."""
    import torch

    from workers.checkpoint import CheckpointManager
    from workers.distributed.ddp import SingleProcessComm
    from workers.distributed.env import DistEnv

    n = 512 if tiny else 5120  # 5120^2 floats = 105 MB
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = {"model": {"w": torch.randn(n, n, device=device)}, "step": 0}
    goal = 0.03 if device == "cuda" else 0.10  # a GPU snapshot is a DMA at bus speed; the CPU's a memcpy
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
    payload = {"stall_s": {k: v.as_dict() for k, v in stats.items()}, "state_mb": size_mb, "device": device,
               "ratio_async_to_sync": ratio, "goal_ratio": goal, "goals": {"ratio_async_to_sync": f"<= {goal}"}}
    text = table([(k, stats[k].median * 1e3, stats[k].lo * 1e3, stats[k].hi * 1e3) for k in stats],
                 ("save", "stall ms", "min", "max"))
    text += f"\nstate {size_mb:.0f} MB on {device}; async/sync stall ratio {ratio:.3f} (goal <= {goal})"
    stats_ms = {k: Stat.of([x * 1e3 for x in v.runs]) for k, v in stats.items()}
    return payload, lambda p: bar_plot(p, f"checkpoint stall, {size_mb:.0f} MB state", stats_ms, "ms"), text


# dense (no sparsity) bf16 tensor-core peak FLOP/s per GPU, from NVIDIA's datasheets, for MFU: the first key that
# is a whole word of torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM part; "A10" is not "A100" nor
# "A10G"); V100 has no bf16, its fp16 peak is listed. A GPU not listed gets a measured bf16 matmul rate instead.
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12), ("H200", 989e12),
              ("GH200", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
              ("L4", 121e12), ("A10", 125e12), ("V100", 125e12))


def gpu_peak(name: str) -> float | None:
    """The datasheet peak of the GPU called ``name``, or None when it is not in PEAK_FLOPS."""
    import re

    return next((v for k, v in PEAK_FLOPS if re.search(rf"\b{re.escape(k)}\b", name)), None)


def _matmul_rate(device: str, dtype: object, n: int, reps: int) -> float:
    """FLOP/s of an n x n matmul on ``device`` (warmed up, device synced around the timing)."""
    import torch

    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return reps * 2 * n**3 / (time.perf_counter() - start)


def device_peak(threads: int = 1) -> tuple[str, float]:
    """(device name, peak FLOP/s of one rank): the datasheet's on a listed GPU (a measured bf16 matmul rate on
    another), a float32 matmul probe on the CPU."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return name, gpu_peak(name) or _matmul_rate("cuda", torch.bfloat16, 8192, 20)
    torch.set_num_threads(threads)
    return f"cpu ({threads} thread)", _matmul_rate("cpu", torch.float32, 1024, 5)


def lm(repeats: int, tiny: bool) -> Result:
    """GPT-style decoder through the launcher: tokens/s and MFU per setting; which was fastest.

    CPU: a small decoder on 2 gloo ranks, per DDP setting, MFU against a 1-thread matmul probe. CUDA: a
    GPT-2-small-sized decoder (124M: 12 layers, width 768, 12 heads, context 1024, vocab 50304) on one rank per
    GPU (NCCL), nanoGPT's recipe: bf16 autocast, flash attention (F.scaled_dot_product_attention), fused AdamW,
    gradient accumulation, eager vs torch.compile; MFU against the GPU's dense bf16 peak (``--tiny``: a small
    decoder, the same settings)."""
    import torch

    from workers.models.gpt import GPT, flops_per_token

    cuda = torch.cuda.is_available()
    steps, interval = (12, 4) if tiny else (120, 20)
    shape = {"model.layers": 2, "model.heads": 4, "model.width": 128, "data.context": 128, "data.vocab_size": 512}
    if tiny:
        shape = {**shape, "model.width": 32, "data.context": 32}
    ranks, batch, accum, precision = 2, 8, 1, "fp32"
    variants = {"default": [], "bucket_1mb": ["ddp.bucket_cap_mb=1"],
                "grad_as_bucket_view": ["ddp.gradient_as_bucket_view=true"],
                "static_graph": ["ddp.static_graph=true"], "compile": ["trainer.compile=true"]}
    extra_args = ["trainer.threads=1"]
    if tiny:
        variants = {k: variants[k] for k in ("default", "static_graph")}
    if cuda:
        ranks = torch.cuda.device_count()
        # bf16 needs Ampere or newer (compute capability 8.0); older GPUs get fp16 with the GradScaler
        precision = "bf16" if torch.cuda.get_device_capability(0) >= (8, 0) else "fp16"
        variants = {"default": [], "compile": ["trainer.compile=true"]}
        # AdamW (fused on CUDA); a small eval split (its 50304-way logits are big); no thread cap for the loader
        extra_args = [f"trainer.precision={precision}", "optimizer=adamw", "data.test_fraction=0.01"]
        if not tiny:
            shape = {"model.layers": 12, "model.heads": 12, "model.width": 768, "data.context": 1024,
                     "data.vocab_size": 50304}
            steps, interval = 60, 10
            # 4 micro-steps of 32 x 1024 tokens (128k tokens a step) take ~35 GB in eager bf16, 16 fit 40 GB. On
            # the H200, 2 x 64 (70.6 GB) gave the same MFU with more time waiting for input (lm_micro64.json)
            memory = torch.cuda.get_device_properties(0).total_memory
            batch, accum = (32, 4) if memory >= 60e9 else (16, 4) if memory >= 40e9 else (4, 4)
            extra_args += ["data.num_samples=512", f"trainer.grad_accum_steps={accum}"]  # epochs repeat: fine
    args = ["model=gpt", "data=synthetic_tokens", *(f"{k}={v}" for k, v in shape.items()), f"data.batch_size={batch}",
            f"trainer.max_steps={steps}", f"trainer.log_every={interval}", "trainer.eval_every=1000000",
            "trainer.checkpoint_every=1000000", *extra_args]

    waits: dict[str, list[float]] = {name: [] for name in variants}  # rank 0's share of a step spent on input
    memory_gb: dict[str, float] = {}  # rank 0's peak GPU memory

    def measure(name: str, extra: list[str]) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as d:
                launch(Path(d), "--gpus", str(ranks), *args, *extra)
                rates = [v for _, v, _ in scalars(Path(d), "perf/tokens_per_s")][1:]  # the first: start-up, compile
                waits[name] += [v for _, v, _ in scalars(Path(d), "perf/data_wait_frac")][1:]
                if cuda:
                    memory_gb[name] = max(v for _, v, _ in scalars(Path(d), "perf/max_memory_gb"))
                return sorted(rates)[len(rates) // 2]
        return run

    stats = interleaved({name: measure(name, extra) for name, extra in variants.items()}, repeats)
    data_wait = {k: sorted(v)[len(v) // 2] for k, v in waits.items() if v}
    with torch.device("meta"):  # the shape is all the count needs: no 124M weights to allocate
        model = GPT(shape["data.vocab_size"], shape["data.context"], shape["model.layers"], shape["model.heads"],
                    shape["model.width"])
    fpt = flops_per_token(model)
    device, peak = device_peak()
    peak_source = ("datasheet, dense bf16" if gpu_peak(device) else "measured bf16 matmul") if cuda \
        else "measured fp32 matmul, 1 thread"
    mfu = {k: v.median * fpt / (peak * ranks) for k, v in stats.items()}  # tokens/s of all ranks
    fastest = max(stats, key=lambda k: stats[k].median)
    payload = {"tokens_per_s": {k: v.as_dict() for k, v in stats.items()}, "mfu": mfu, "fastest": fastest,
               "data_wait_frac": data_wait, "max_memory_gb": memory_gb,
               "flops_per_token": fpt, "device": device, "peak_flops_per_rank": peak, "peak_source": peak_source,
               "ranks": ranks, "precision": precision, "batch_per_rank": batch, "grad_accum_steps": accum,
               "steps": steps, "shape": shape,
               "reference": "nanoGPT and torchtitan report about 0.40 MFU on A100/H100",
               # an MFU goal only means something against a GPU's tensor-core peak, not the CPU probe
               # and the loader keeps the GPU fed: waiting for input is at most 2 % of a step
               "goals": {f"mfu.{fastest}": ">= 0.4", f"data_wait_frac.{fastest}": "<= 0.02"} if cuda and not tiny
               else {}}
    text = table([(k, stats[k].median, stats[k].lo, stats[k].hi, mfu[k], data_wait.get(k, float("nan")))
                  for k in stats], ("setting", "tokens/s", "min", "max", "MFU", "data wait"))
    text += (f"\nfastest here: {fastest}; {fpt} FLOPs/token; peak per rank {peak / 1e9:.1f} GFLOP/s ({device}, "
             f"{peak_source}); {ranks} ranks, {precision}")
    return payload, lambda p: bar_plot(p, f"lm: tokens/s per setting ({device})", stats, "tokens/s"), text


SUITES: dict[str, Callable[[int, bool], Result]] = {
    "overhead": overhead, "backends": backends, "scaling": scaling, "allreduce": allreduce, "checkpoint": checkpoint,
    "lm": lm,
}
