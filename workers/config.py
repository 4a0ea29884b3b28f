"""The training config schema: one dataclass per concern.

The launcher composes ``configs/`` with Hydra, checks the result against these dataclasses
(unknown keys, wrong types and bad values are caught before any process starts) and writes the
resolved YAML into the run directory. Workers load that file with :func:`load` and only ever see
these dataclasses, never a DictConfig.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A config value is invalid; the message names the dotted key."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


@dataclass
class ModelConfig:
    name: str = "mlp"  # mlp | gpt
    hidden: int = 128  # mlp: hidden units
    layers: int = 2  # gpt: transformer blocks
    heads: int = 4  # gpt: attention heads (width must divide by it)
    width: int = 128  # gpt: embedding width

    def __post_init__(self) -> None:
        _check(self.name in ("mlp", "gpt"), "model.name", self.name, "mlp | gpt")
        _check(self.hidden > 0, "model.hidden", self.hidden, "a positive int")
        _check(self.width % self.heads == 0, "model.width", self.width, f"a multiple of model.heads={self.heads}")


@dataclass
class DataConfig:
    name: str = "digits"  # digits | synthetic | tokens | synthetic_tokens
    batch_size: int = 32  # samples (token windows for LMs) per rank per micro-step
    test_fraction: float = 0.2
    split_seed: int = 0  # fixes the train/test split independently of the training seed
    num_samples: int = 8192  # synthetic only
    num_features: int = 64  # synthetic only
    num_classes: int = 10  # synthetic only
    path: str | None = None  # tokens: a flat file of uint16 token ids (read with numpy.memmap)
    context: int = 128  # tokens, synthetic_tokens: tokens per training window
    vocab_size: int = 512  # tokens, synthetic_tokens

    def __post_init__(self) -> None:
        names = ("digits", "synthetic", "tokens", "synthetic_tokens")
        _check(self.name in names, "data.name", self.name, " | ".join(names))
        _check(self.name != "tokens" or bool(self.path), "data.path", self.path, "a token file for data=tokens")
        _check(self.batch_size > 0, "data.batch_size", self.batch_size, "a positive int")
        _check(0 < self.test_fraction < 1, "data.test_fraction", self.test_fraction, "0 < x < 1")


@dataclass
class OptimizerConfig:
    name: str = "adam"  # sgd | adam | adamw
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw only
    scale_lr_with_world_size: bool = False  # lr *= world_size (linear scaling rule), only if asked

    def __post_init__(self) -> None:
        _check(self.name in ("sgd", "adam", "adamw"), "optimizer.name", self.name, "sgd | adam | adamw")
        _check(self.lr > 0, "optimizer.lr", self.lr, "a positive float")
        _check(len(self.betas) == 2, "optimizer.betas", self.betas, "two floats")
        _check(not self.nesterov or self.momentum > 0, "optimizer.nesterov", self.nesterov,
               "false unless optimizer.momentum > 0")


@dataclass
class ScheduleConfig:
    name: str = "constant"  # constant | step | linear | cosine
    warmup_steps: int = 0  # linear warmup from 0 to lr over this many steps
    min_lr: float = 0.0  # floor reached at total_steps by linear/cosine decay
    total_steps: int | None = None  # decay horizon; None = trainer.max_steps
    step_size: int = 100  # step schedule: decay every step_size steps
    gamma: float = 0.5  # step schedule: decay factor

    def __post_init__(self) -> None:
        names = ("constant", "step", "linear", "cosine")
        _check(self.name in names, "schedule.name", self.name, " | ".join(names))
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an int >= 0")
        _check(self.step_size > 0, "schedule.step_size", self.step_size, "a positive int")


@dataclass
class TrainerConfig:
    max_steps: int = 500  # optimizer steps
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA only)
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = False  # rank 0 snapshots to CPU and a thread writes; training goes on
    compile: bool = False  # torch.compile the model
    threads: int = 0  # torch threads per rank; 0 = cores / local ranks

    def __post_init__(self) -> None:
        _check(self.max_steps >= 0, "trainer.max_steps", self.max_steps, "an int >= 0")
        for key in ("grad_accum_steps", "log_every", "eval_every", "checkpoint_every",
                    "keep_checkpoints"):
            value = getattr(self, key)
            _check(value > 0, f"trainer.{key}", value, "a positive int")
        _check(self.precision in ("fp32", "bf16"), "trainer.precision", self.precision, "fp32 | bf16")
        _check(self.grad_clip >= 0, "trainer.grad_clip", self.grad_clip, "a float >= 0")
        _check(self.threads >= 0, "trainer.threads", self.threads, "an int >= 0")


@dataclass
class OnlineConfig:
    """mode=online: learn from a stream of records as they arrive (workers/stream.py, workers/online.py)."""

    source: str = "synthetic"  # file | shards | synthetic
    path: str | None = None  # file: JSON lines or CSV being appended to; shards: a directory of files
    format: str = "jsonl"  # jsonl ({"x": [...], "y": label} or [x..., label]) | csv (x...,label)
    batch_size: int = 1  # records per rank per update: 1 = per-sample SGD, k = the last k records
    poll_s: float = 0.2  # how often a quiet stream is checked for new records
    idle_timeout_s: float = 30.0  # no new record for this long: checkpoint and end cleanly (0 = never)
    checkpoint_every_s: float = 0.0  # also checkpoint on wall time (0 = steps only)
    window: int = 1000  # records in the rolling prequential (test-then-train) accuracy
    records: int = 0  # synthetic: how many records the stream has (0 = endless)

    def __post_init__(self) -> None:
        _check(self.source in ("file", "shards", "synthetic"), "online.source", self.source,
               "file | shards | synthetic")
        _check(self.source == "synthetic" or bool(self.path), "online.path", self.path,
               f"a path for online.source={self.source}")
        _check(self.format in ("jsonl", "csv"), "online.format", self.format, "jsonl | csv")
        _check(self.batch_size > 0, "online.batch_size", self.batch_size, "a positive int")
        _check(self.poll_s > 0, "online.poll_s", self.poll_s, "a positive float")
        _check(self.idle_timeout_s >= 0, "online.idle_timeout_s", self.idle_timeout_s, "a float >= 0")
        _check(self.window > 0, "online.window", self.window, "a positive int")


@dataclass
class DDPConfig:
    """DistributedDataParallel knobs (ignored by the Horovod and single-process paths)."""

    bucket_cap_mb: float = 25.0  # gradient bucket size
    gradient_as_bucket_view: bool = False  # grads alias the buckets: less memory, one copy less
    static_graph: bool = False  # the graph is the same every step: lets DDP skip some bookkeeping


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ddp: DDPConfig = field(default_factory=DDPConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    seed: int = 0
    mode: str = "batch"  # batch: epochs over a dataset | online: a stream, each record trained once

    def __post_init__(self) -> None:
        _check(self.mode in ("batch", "online"), "mode", self.mode, "batch | online")
        # online streams may never end: max_steps=0 means no limit there
        _check(self.trainer.max_steps > 0 or self.mode == "online", "trainer.max_steps", self.trainer.max_steps,
               "a positive int (0 = unlimited is for mode=online)")


def from_container(container: Any) -> Config:
    """Typed Config from a DictConfig/dict; raises ConfigError naming the bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), container)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except Exception as e:  # omegaconf's errors carry the full key and value
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {msg}" if key else msg) from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def load(path: str | Path) -> Config:
    """Load the resolved config that the launcher wrote into the run directory."""
    return from_container(OmegaConf.load(path))
