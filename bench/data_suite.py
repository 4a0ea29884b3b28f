"""The ``data`` suite: the input pipeline, measured through the launcher and the built-in trainer.

    python -m bench data [--tiny]

1. DataLoader workers: a dataset whose ``__getitem__`` costs about 1 ms of CPU (it decodes an in-memory
   128x128 PNG with PIL and filters it with numpy, like an image pipeline's decode and augment) trains a
   small MLP with ``data.num_workers`` 0 and 2, one rank (so there is a free core for the workers to use)
   and, beside it, two ranks (every core already busy with a rank: the workers have nothing to add).
2. The in-memory fast path: the same tensors as a ``TensorDataset`` (one tensor index per batch) and as a
   plain map-style dataset (``__getitem__`` + collate per sample), 2 ranks, no workers.

Each measurement is a real ``python -m launcher`` run; its samples/s is the median of the trainer's
``perf/samples_per_s`` (TensorBoard) over the logging intervals after the first (start-up and worker
spawn). The data functions below are the runs' ``data._target_``. Beside them, interleaved with them,
the input pipeline alone: ``workers.data.loader.TrainLoader`` in this process, one thread, batches taken
and dropped (``loader:`` rows): what the pipeline delivers without a training step or the launcher's
processes beside it. Both kinds need idle cores, so the share of the machine's CPU that other processes
used during each measurement is recorded (``neighbours_cpu_share``): on a shared 2-core machine a busy
neighbour takes the core the workers would use.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bench.common import Stat, interleaved, launch, steady_rate, table
from workers.data.builtin import synthetic

Result = tuple[dict[str, object], Callable[[Path], None], str]

FEATURES, CLASSES = 64, 10  # the default MLP's input and output sizes


# -- the datasets (data._target_ of the runs) ------------------------------------------------------------
class DecodeImages(Dataset):
    """Item i: decode PNG ``i % distinct`` (``image_size`` square, RGB), grey, two 3x3 smoothing passes,
    8x8 block means -> (64 float features, label i % 10). About 1 ms of one core at image_size=128."""

    def __init__(self, num_samples: int, image_size: int = 128, distinct: int = 32, seed: int = 0) -> None:
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.num_samples, self.images = num_samples, []
        for _ in range(distinct):  # smooth colour blobs plus noise: a photo-like PNG, not a trivially packed one
            base = Image.fromarray(rng.integers(0, 256, (image_size // 8, image_size // 8, 3), dtype=np.uint8))
            pixels = np.asarray(base.resize((image_size, image_size), Image.BILINEAR), dtype=np.int16)
            pixels = np.clip(pixels + rng.integers(-8, 9, pixels.shape), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            self.images.append(buf.getvalue())

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(io.BytesIO(self.images[i % len(self.images)])) as img:
            g = np.asarray(img.convert("RGB"), dtype=np.float32).mean(-1)
        for _ in range(2):
            g = (g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] + 4 * g[1:-1, 1:-1]) / 8
        s = g.shape[0] // 8
        features = g[: 8 * s, : 8 * s].reshape(8, s, 8, s).mean((1, 3)).reshape(-1) / 255.0
        return torch.from_numpy(features.astype(np.float32)), i % CLASSES


def decode_images(num_samples: int, image_size: int = 128) -> tuple[Dataset, None]:
    return DecodeImages(num_samples, image_size), None


class Plain(Dataset):
    """The same tensors as a TensorDataset, but an ordinary map-style dataset: per-sample items, collated."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def plain_synthetic(num_samples: int, num_features: int, num_classes: int, test_fraction: float = 0.1,
                    split_seed: int = 0) -> tuple[Dataset, Dataset]:
    """``workers.data.builtin.synthetic``'s very tensors, without the TensorDataset fast path."""
    train, held_out = synthetic(num_samples, num_features, num_classes, test_fraction, split_seed)
    return Plain(*train.tensors), Plain(*held_out.tensors)


def item_ms(dataset: Dataset, n: int = 200) -> float:
    """Mean milliseconds of one ``__getitem__`` in this process (one core)."""
    dataset[0]
    start = time.perf_counter()
    for i in range(n):
        dataset[i]
    return (time.perf_counter() - start) / n * 1e3


def loader_rate(dataset: Dataset, batch: int, workers: int, batches: int) -> float:
    """Samples/s of ``TrainLoader`` (one rank, CPU) alone, after its first batches (worker start-up)."""
    from workers.data.loader import TrainLoader, loader_kwargs

    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(1)  # as a rank with trainer.threads=1: no intra-op threads spinning on a busy core
    try:
        loader = TrainLoader(dataset, batch, 1, 0, 0, cpu, loader_kwargs({"num_workers": workers}, cpu))
        it = iter(loader)
        for _ in range(max(3, 2 * workers)):
            next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches * batch / (time.perf_counter() - start)
        del it, loader  # shuts the workers down
    finally:
        torch.set_num_threads(threads)
    return rate


class Neighbours:
    """The share of the machine's CPU time that processes outside this suite used while it measured: all
    busy time (/proc/stat) less this process's and its reaped descendants' (the launcher, torchrun, ranks,
    DataLoader workers). Measurements taken while a neighbour was busy are not comparable; they are kept,
    with this share beside them."""

    def __init__(self) -> None:
        self.shares: list[float] = []

    @staticmethod
    def _machine() -> tuple[float, float]:  # (busy, total) seconds of all cores since boot
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz

    @staticmethod
    def _ours() -> float:
        import resource

        return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))

    def measure(self, fn: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            try:
                (busy0, total0), ours0 = self._machine(), self._ours()
            except OSError:  # no /proc: nothing to say about the neighbours
                return fn()
            value = fn()
            (busy1, total1), ours1 = self._machine(), self._ours()
            self.shares.append(max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(total1 - total0, 1e-9))
            return value
        return run


# -- the suite ---------------------------------------------------------------------------------------
def _common(steps: int, interval: int) -> list[str]:
    return [f"trainer.max_steps={steps}", f"trainer.log_every={interval}", "trainer.eval_every=1000000",
            "trainer.checkpoint_every=1000000", "trainer.grad_clip=0", "trainer.threads=1"]


def data(repeats: int, tiny: bool) -> Result:
    """DataLoader workers 0 vs 2 on a ~1 ms/item dataset; TensorDataset fast path vs a plain dataset."""
    decode_steps, decode_interval, num_samples = (40, 10, 4096) if tiny else (300, 50, 65536)
    fast_steps, fast_interval = (60, 20) if tiny else (3000, 250)
    decode = ["data._target_=bench.data_suite.decode_images", f"data.num_samples={num_samples}",
              "data.batch_size=32", *_common(decode_steps, decode_interval)]
    in_memory = ["data=synthetic", "data.batch_size=64", *_common(fast_steps, fast_interval)]
    plain = [*in_memory, "data._target_=bench.data_suite.plain_synthetic", *(
        f"data.{k}={v}" for k, v in (("num_samples", 8192), ("num_features", 64), ("num_classes", 10)))]
    runs: dict[str, list[str]] = {
        "1 rank, 0 workers": ["--gpus", "1", *decode, "data.num_workers=0"],
        "1 rank, 2 workers": ["--gpus", "1", *decode, "data.num_workers=2"],
        "2 ranks, 0 workers": ["--gpus", "2", *decode, "data.num_workers=0"],
        "2 ranks, 2 workers": ["--gpus", "2", *decode, "data.num_workers=2"],
        "TensorDataset": ["--gpus", "2", *in_memory],
        "plain dataset": ["--gpus", "2", *plain],
    }
    if tiny:
        runs = {k: v for k, v in runs.items() if not k.startswith("2 ranks")}

    def measure(args: list[str]) -> Callable[[], float]:
        def run() -> float:
            with tempfile.TemporaryDirectory() as d:
                launch(Path(d), *args)
                return steady_rate(Path(d))
        return run

    images, (tensors, _) = DecodeImages(num_samples), synthetic(8192, 64, 10)
    plain_set = Plain(*tensors.tensors)
    decode_batches, fast_batches = (10, 100) if tiny else (60, 2000)
    alone: dict[str, Callable[[], float]] = {
        "loader: 0 workers": lambda: loader_rate(images, 32, 0, decode_batches),
        "loader: 2 workers": lambda: loader_rate(images, 32, 2, decode_batches),
        "loader: TensorDataset": lambda: loader_rate(tensors, 64, 0, fast_batches),
        "loader: plain dataset": lambda: loader_rate(plain_set, 64, 0, fast_batches),
    }
    cost = item_ms(images)
    neighbours = Neighbours()
    stats = interleaved({name: neighbours.measure(fn) for name, fn in
                         {**{name: measure(args) for name, args in runs.items()}, **alone}.items()}, repeats)
    busy = max(neighbours.shares, default=None)
    ratio = lambda a, b: stats[a].median / stats[b].median  # noqa: E731
    ratios = {"workers_2_to_0_1rank": ratio("1 rank, 2 workers", "1 rank, 0 workers"),
              "fast_path_to_plain": ratio("TensorDataset", "plain dataset"),
              "loader_workers_2_to_0": ratio("loader: 2 workers", "loader: 0 workers"),
              "loader_fast_path_to_plain": ratio("loader: TensorDataset", "loader: plain dataset")}
    if "2 ranks, 0 workers" in stats:
        ratios["workers_2_to_0_2ranks"] = ratio("2 ranks, 2 workers", "2 ranks, 0 workers")
    payload = {"samples_per_s": {k: v.as_dict() for k, v in stats.items()}, "ratios": ratios,
               "goal_workers_2_to_0_1rank": 1.6, "goal_fast_path_to_plain": 1.0, "item_ms": cost,
               "goals": {"ratios.workers_2_to_0_1rank": ">= 1.6", "ratios.fast_path_to_plain": ">= 1.0"},
               "method": "python -m launcher runs of the built-in trainer; perf/samples_per_s from TensorBoard, "
                         "median over logging intervals after the first. loader: rows: TrainLoader alone, "
                         "in the suite's process, batches dropped",
               "cpus": os.cpu_count(),
               "neighbours_cpu_share": {"max": busy, "per_measurement": neighbours.shares},
               "config": {"decode": {"steps": decode_steps, "batch_per_rank": 32, "num_samples": num_samples,
                                     "image_size": 128, "threads_per_rank": 1},
                          "fast_path": {"steps": fast_steps, "batch_per_rank": 64, "ranks": 2, "num_workers": 0}}}
    text = table([(k, stats[k].median, stats[k].lo, stats[k].hi) for k in stats], ("run", "samples/s", "min", "max"))
    text += f"\n__getitem__ of the decode dataset: {cost:.2f} ms (one core, this process); {os.cpu_count()} cores"
    if busy is not None:
        text += f"\nother processes used up to {100 * busy:.0f}% of the machine's CPU during a measurement"
    text += f"\nworkers 2 / 0, 1 rank:  {ratios['workers_2_to_0_1rank']:.2f}x (goal >= 1.6)"
    if "workers_2_to_0_2ranks" in ratios:
        text += f"\nworkers 2 / 0, 2 ranks: {ratios['workers_2_to_0_2ranks']:.2f}x (the ranks already use every core)"
    text += f"\nTensorDataset / plain dataset: {ratios['fast_path_to_plain']:.2f}x (goal >= 1.0)"
    text += (f"\nloader alone: workers 2 / 0 {ratios['loader_workers_2_to_0']:.2f}x, "
             f"TensorDataset / plain {ratios['loader_fast_path_to_plain']:.2f}x")
    return payload, lambda p: _plot(p, stats), text


def _plot(path: Path, stats: dict[str, Stat]) -> None:
    import matplotlib.pyplot as plt

    panels = [("trainer: ~1 ms/item decode", [k for k in stats if "workers" in k and ":" not in k]),
              ("trainer: in memory, 2 ranks", ["TensorDataset", "plain dataset"]),
              ("TrainLoader alone, 1 rank", [k for k in stats if k.startswith("loader:")])]
    widths = [len(names) for _, names in panels]
    fig, axes = plt.subplots(1, 3, figsize=(2.2 * sum(widths), 4), gridspec_kw={"width_ratios": widths})
    for ax, (title, names) in zip(axes, panels, strict=True):
        meds = [stats[n].median for n in names]
        errs = [[stats[n].median - stats[n].lo for n in names], [stats[n].hi - stats[n].median for n in names]]
        labels = [n.removeprefix("loader: ").replace(", ", "\n").replace(" dataset", "\ndataset") for n in names]
        ax.bar(labels, meds, yerr=errs, capsize=4, color="#4c72b0")
        ax.set_title(title)
        ax.set_ylabel("samples/s")
        ax.set_yscale("log" if max(meds) > 20 * min(meds) else "linear")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"bench data: samples/s ({os.cpu_count()} CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
