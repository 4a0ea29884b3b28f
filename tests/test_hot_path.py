"""What a training step does and does not do (issue #17): TensorBoard and reductions only at log steps, the
signal check riding on the log step's all-reduce, batches sliced from tensors, and a launcher that imports no
torch for the built-in presets. In-process and quick: the trainer runs on one rank without torch.distributed."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from launcher.config import hydra as composition
from launcher.config.compose import DEFAULT_CONFIG_DIR, compose_config
from launcher.errors import UsageError
from workers import config as schema
from workers import hooks, task, trainer
from workers.data.loader import TrainLoader
from workers.distributed.ddp import SingleProcessComm
from workers.distributed.env import DistEnv
from workers.optim import lr_at
from workers.sources import SIGNAL_POLL_EVERY, EpochSource

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["data=synthetic", "data.num_samples=1024", "data.batch_size=16", "trainer.eval_every=1000000",
         "trainer.checkpoint_every=1000000", "trainer.threads=1"]


class Recorder:
    """The logger rank 0 would get: (step, tags) of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[str]]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self.calls.append((step, sorted(metrics)))

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class CountingComm(SingleProcessComm):
    """One rank; notes the trainer's step at every all-reduce."""

    def __init__(self) -> None:
        super().__init__(DistEnv())
        self.trainer: trainer.Trainer | None = None
        self.reduced_at: list[int] = []

    def allreduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        assert self.trainer is not None
        self.reduced_at.append(self.trainer.step)
        return tensor


@contextlib.contextmanager
def own_signal_handlers() -> Iterator[None]:
    """The trainer installs SIGTERM/SIGINT/SIGUSR1 handlers: give pytest its own back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> tuple[Recorder, CountingComm]:
    recorder, comm = Recorder(), CountingComm()
    monkeypatch.setattr(trainer, "build_logger", lambda *_, **__: recorder)
    with own_signal_handlers():
        run = trainer.Trainer(compose_config([*SMALL, *overrides]), comm, tmp_path)
        comm.trainer = run
        run.train()
    return recorder, comm


def test_only_log_steps_touch_tensorboard_or_reduce(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder, comm = train(tmp_path, monkeypatch, "trainer.max_steps=25", "trainer.log_every=10")
    assert {step for step, _ in recorder.calls} == {10, 20, 25}  # the last step logs too
    at_10 = [tags for step, tags in recorder.calls if step == 10]
    assert at_10 == [["lr", "perf/data_wait_frac", "perf/samples_per_s", "train/epoch", "train/grad_norm",
                      "train/loss"]]
    # one all-reduce per log step (loss + stop/save flags), the final evaluation's, nothing between
    assert comm.reduced_at == [10, 20, 25, 25]


def test_lr_every_step_on_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder, _ = train(tmp_path, monkeypatch, "trainer.max_steps=25", "trainer.log_every=10", "schedule=cosine",
                        "schedule.warmup_steps=5", "trainer.log_lr_every_step=true")
    lr_steps = [step for step, tags in recorder.calls if "lr" in tags]
    assert lr_steps == list(range(1, 26))  # each step once: a log step's lr is not written twice
    cfg = compose_config([*SMALL, "schedule=cosine", "schedule.warmup_steps=5", "trainer.max_steps=25"])
    peak = task.peak_lr(cfg, 1)
    assert [lr_at(s - 1, peak, cfg.schedule, 25) for s in lr_steps][:5] == pytest.approx([peak * k / 5 for k in
                                                                                          range(1, 6)])


def test_accumulated_loss_is_the_micro_batches_sum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With grad_accum_steps=2 the logged loss is the mean of the step's two micro-batch losses, as before."""
    losses: list[float] = []
    original = trainer.agree

    def agree(comm: Any, loss_sum: torch.Tensor, *parts: list[float]) -> tuple[float, list[list[float]]]:
        losses.append(float(loss_sum))
        return original(comm, loss_sum, *parts)

    monkeypatch.setattr(trainer, "agree", agree)
    train(tmp_path, monkeypatch, "trainer.max_steps=4", "trainer.log_every=2", "trainer.grad_accum_steps=2")
    assert len(losses) == 2 and all(1.0 < v < 5.0 for v in losses)  # ~ln(10): a mean, not a sum of two


# -- the signal check: on the log step's all-reduce, a poll of its own only when log steps are far apart --------
class FakeTrainer:
    """What EpochSource is built from (a loader, the comm, the signal flags); counts the signal polls (each a
    collective)."""

    def __init__(self) -> None:
        from workers.signals import SignalFlags

        self.step, self.polls = 0, []
        self.comm = SingleProcessComm(DistEnv())
        self.loader = type("L", (), {"epoch": 0, "batch_size": 8, "__iter__": lambda _: iter(())})()
        with own_signal_handlers():
            self.signals = SignalFlags()
        poll = self.signals.poll
        self.signals.poll = lambda comm: (self.polls.append(self.step), poll(comm))[1]  # type: ignore[method-assign]

    def source(self) -> EpochSource:
        return EpochSource(self.loader, self.comm, self.signals, 1)  # type: ignore[arg-type]


def test_signals_ride_on_log_steps_and_are_acted_on_at_the_same_step() -> None:
    t = FakeTrainer()
    source = t.source()
    source.start(t.step)
    for t.step in range(0, SIGNAL_POLL_EVERY + 1):
        source.next(t.step)
    assert t.polls == [SIGNAL_POLL_EVERY]  # none before SIGNAL_POLL_EVERY steps
    # SIGUSR1, then a log step at step 15: the flags ride on its all-reduce (here the identity: one rank)
    t.signals._on_save(signal.SIGUSR1, None)
    t.step = 15
    source.log(source.log_values(t.step), t.step)
    turn = source.next(15)  # the next turn, at the same step on every rank: save now
    assert turn.save and not turn.stop and t.polls == [SIGNAL_POLL_EVERY]  # no poll of its own
    assert not source.next(15).save  # once


def test_poll_interval_follows_the_step_time() -> None:
    """Rank 0 proposes how many steps take about a second; with log steps closer than that, no poll of its own."""
    t = FakeTrainer()
    source = t.source()
    source.start(t.step)
    source.window_at -= 1.0  # 100 steps in the last second: a proposal of ~100 steps
    t.step = 100
    source.log(source.log_values(t.step), t.step)
    assert 90 <= source.poll_every <= 100
    t.signals.stop_signal = signal.SIGTERM
    t.step = 150
    assert not source.next(t.step).stop and t.polls == []  # 50 steps since the agreement: not yet
    t.step = 100 + source.poll_every
    assert source.next(t.step).stop and t.polls == [t.step]


# -- batches: tensor slices, the same samples as the DataLoader's ------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sliced_batches_equal_the_dataloaders(world: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = torch.arange(203 * 2, dtype=torch.float32).view(203, 2), torch.arange(203)  # y: the sample's index
    data = TensorDataset(x, y)
    taken: dict[int, list[list[int]]] = {}  # id(loader) -> the indices hooks.batch_taken saw, in order
    monkeypatch.setattr(hooks, "batch_taken", hooks.Hook([lambda loader, idx: taken[id(loader)].append(idx)]))
    for rank in range(world):
        fast, plain = (TrainLoader(data, 8, world, rank, 3, torch.device("cpu"), {"num_workers": 0,
                                                                                  "pin_memory": False})
                       for _ in range(2))
        assert fast.tensors is not None
        plain.tensors = None  # the DataLoader path
        for loader in (fast, plain):
            loader.load_state_dict({"epoch": 1, "epoch_pos": 3 * 8 * world})
            taken[id(loader)] = []
        for (a, b), (c, d) in zip(fast, plain, strict=False):
            assert torch.equal(a, c) and torch.equal(b, d) and fast.state_dict() == plain.state_dict()
            # the hook saw this batch's indices as it was taken, on both paths
            assert taken[id(fast)][-1] == taken[id(plain)][-1] == b.tolist()
            if fast.epoch == 4:
                break
        assert len(taken[id(fast)]) == len(taken[id(plain)]) > 20  # one call per batch taken, not per batch loaded


# -- the launcher: presets as shipped are not imported; everything else is checked before anything starts -------
def test_dry_run_imports_no_torch() -> None:
    code = ("import sys, contextlib, io\nfrom launcher.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['--dry-run', '--gpus', '2', '--run-dir', '/nonexistent/x', 'data=synthetic',"
            " 'data.batch_size=64', 'optimizer.lr=0.01']) == 0\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# every shipped combination that composes (gpt takes its vocabulary from a token dataset)
PRESETS = [(m, d) for m in ("mlp", "gpt") for d in ("digits", "synthetic", "synthetic_tokens")
           if m == "mlp" or d == "synthetic_tokens"]


@pytest.mark.parametrize(("model", "data"), PRESETS)
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_every_shipped_preset_passes_the_check_it_skips(model: str, data: str, optimizer: str) -> None:
    overrides = [f"model={model}", f"data={data}", f"optimizer={optimizer}"]
    shipped: set[str] = set()
    cfg = composition.compose(overrides, DEFAULT_CONFIG_DIR, builtin=DEFAULT_CONFIG_DIR, shipped=shipped)
    task.check(cfg)  # what the launcher skips for `shipped` passes
    assert {"data", "loss", "optimizer", "metrics.accuracy"} <= shipped
    assert ("model" in shipped) == (model == "mlp")  # gpt's vocab comes from data: always checked


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.hidden=-3"], "model: workers.models.mlp.MLP"),  # a preset's value: its constructor is checked
    (["optimizer.momentm=0.9"], "unexpected keyword argument 'momentm'"),  # a key the preset lacks
    (["model=gpt", "data=synthetic_tokens", "data.vocab_size=-1"], "model: workers.models.gpt.GPT"),  # via ${}
    (["data.num_samplez=5", "data=synthetic"], "data: workers.data.builtin.synthetic"),
])
def test_a_changed_preset_is_still_checked_before_anything_starts(overrides: list[str], message: str) -> None:
    with pytest.raises(UsageError) as e:
        compose_config(overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("overrides", [[], ["optimizer=sgd", "schedule=linear", "trainer.max_steps=7"],
                                       ["model=gpt", "data=synthetic_tokens", "optimizer.betas=[0.9,0.95]"],
                                       ["mode=online", "trainer.max_steps=0", "online.source=file", "online.path=a"],
                                       ["trainer.grad_clip=0", "ddp.bucket_cap_mb=1", "optimizer.lr=1e-5"]])
def test_ranks_read_the_resolved_config_without_omegaconf(tmp_path: Path, overrides: list[str]) -> None:
    """load_resolved (plain YAML, what ranks use) gives what the schema's load gives, value for value and type
    for type; and a rank's import of the trainer pulls in neither Hydra nor OmegaConf."""
    cfg = compose_config(overrides)
    (tmp_path / "config.yaml").write_text(schema.to_yaml(cfg))
    fast, checked = schema.load_resolved(tmp_path / "config.yaml"), schema.load(tmp_path / "config.yaml")
    assert fast == checked == cfg
    for node in ("schedule", "trainer", "ddp", "online"):
        assert [type(v) for v in vars(getattr(fast, node)).values()] == \
               [type(v) for v in vars(getattr(checked, node)).values()]
    if not overrides:
        code = "import sys, workers.train; print(sorted(m for m in ('omegaconf', 'hydra') if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "[]"


# -- the compose cache (launcher/config/cache.py) ----------------------------------------------------------------
def test_a_cached_compose_is_the_same_config_without_hydra(tmp_path: Path) -> None:
    overrides = ["data=synthetic", "data.batch_size=64", "optimizer=sgd", "trainer.max_steps=9"]
    first = compose_config(overrides, cache=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1 and compose_config(overrides, cache=tmp_path) == first
    code = ("import sys\nfrom pathlib import Path\nfrom launcher.config.compose import compose_config\n"
            f"compose_config({overrides!r}, cache=Path({str(tmp_path)!r}))\n"
            "print(sorted(m for m in ('hydra', 'omegaconf', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_what_the_compose_cache_keys_on(tmp_path: Path) -> None:
    from launcher.config import cache as compose_cache

    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "config.yaml").write_text("defaults:\n  - base\n  - _self_\n")
    (conf / "model" / "net.yaml").write_text("_target_: my.Net\nwidth: 4\n")
    key = compose_cache.key(["model=net"], [conf, DEFAULT_CONFIG_DIR])
    assert key and key != compose_cache.key(["model=net", "seed=1"], [conf, DEFAULT_CONFIG_DIR])
    (conf / "model" / "net.yaml").write_text("_target_: my.Net\nwidth: 8\n")
    assert compose_cache.key(["model=net"], [conf, DEFAULT_CONFIG_DIR]) not in (None, key)  # a file changed
    assert compose_cache.key(["seed=${oc.env:SEED}"], [DEFAULT_CONFIG_DIR]) is None  # a resolver: not cached
    assert compose_cache.key(["hydra.searchpath=[file:///x]"], [DEFAULT_CONFIG_DIR]) is None
    (conf / "model" / "net.yaml").write_text("_target_: my.Net\nwidth: ${now:%S}\n")
    assert compose_cache.key(["model=net"], [conf, DEFAULT_CONFIG_DIR]) is None
    assert compose_cache.directory({"LAUNCHER_COMPOSE_CACHE": "0"}) is None


def test_the_compose_cache_keys_on_the_composition_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The schema and the Hydra compose are in the key as the files Python imports (a stale path would hash as
    missing, and a changed schema would hit an old entry)."""
    from launcher.config import cache as compose_cache

    assert (Path(schema.__file__), Path(composition.__file__)) == compose_cache.CODE
    assert all(path.is_file() for path in compose_cache.CODE)
    key = compose_cache.key([], [DEFAULT_CONFIG_DIR])
    copies = []
    for path in compose_cache.CODE:
        copies.append(tmp_path / path.name)
        copies[-1].write_bytes(path.read_bytes())
    monkeypatch.setattr(compose_cache, "CODE", tuple(copies))
    assert compose_cache.key([], [DEFAULT_CONFIG_DIR]) == key  # the same content: the same entry
    for copy in copies:
        copy.write_bytes(copy.read_bytes() + b"\n# changed\n")
        assert compose_cache.key([], [DEFAULT_CONFIG_DIR]) != key
        key = compose_cache.key([], [DEFAULT_CONFIG_DIR])


def test_a_cache_hit_still_checks_the_users_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hard rule holds on a hit: a target that stopped importing is exit 2 before anything starts."""
    (tmp_path / "mytask_cached.py").write_text("from torch import nn\n\n\ndef net(width: int = 4):\n"
                                              "    return nn.Linear(64, 10)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["model._target_=mytask_cached.net", "model.width=3"]
    compose_config(overrides, cache=tmp_path / "cache")
    (tmp_path / "mytask_cached.py").write_text("def net(depth: int):\n    pass\n")
    sys.modules.pop("mytask_cached", None)
    with pytest.raises(UsageError, match="unexpected keyword argument 'width'"):
        compose_config(overrides, cache=tmp_path / "cache")


def test_a_damaged_cache_entry_is_composed_again(tmp_path: Path) -> None:
    overrides = ["data=synthetic", "trainer.max_steps=7"]
    first = compose_config(overrides, cache=tmp_path)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text('{"config": {"model": {}}, "shipped": []}')  # valid JSON, not a config
    assert compose_config(overrides, cache=tmp_path) == first
    assert json.loads(entry.read_text())["config"]["trainer"]["max_steps"] == 7  # written anew
