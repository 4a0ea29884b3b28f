"""The training config's schema: the dataclasses the ranks read, their checks, and YAML in and out.

Defaults live in one place, the YAML files of ``configs/`` (``config.yaml`` and one directory per
group). The dataclasses below only give types and checks; none of their fields has a default, so a
value missing from the YAML is an error, not a second, silent default.

The user's parts are Hydra ``_target_`` nodes — ``model``, ``data``, ``loss``, ``optimizer`` and each
entry of ``metrics`` — whose other keys are passed to the target (see workers/task.py). A few keys of
``data`` and ``optimizer`` are the trainer's own (``DATA_KEYS``, ``OPTIMIZER_KEYS``) and are not passed.

The launcher composes once with Hydra (launcher/config/hydra.py, which checks the result here with
:func:`from_container`), checks the targets (workers/task.py) and writes the resolved YAML into the run
directory; every rank loads that file with :func:`load_resolved`, which takes a few milliseconds and needs
neither Hydra nor OmegaConf (whose import alone costs a rank a twentieth of a second before its first
step): OmegaConf is imported only where a config is checked against the schema.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MISSING: Any = "???"  # OmegaConf's MISSING (the same literal), without importing OmegaConf


class ConfigError(ValueError):
    """A config value is invalid; the message names the dotted key."""


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {allowed}")


# keys of `data` and `optimizer` that the trainer reads itself; every other key goes to the target
DATA_KEYS = ("batch_size", "num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
OPTIMIZER_KEYS = ("scale_lr_with_world_size", "decay_norms_and_biases")


@dataclass
class ScheduleConfig:
    name: str = MISSING  # constant | step | linear | cosine
    warmup_steps: int = MISSING  # linear warmup from 0 to lr over this many steps
    min_lr: float = MISSING  # floor reached at total_steps by linear/cosine decay
    total_steps: int | None = MISSING  # decay horizon; None = trainer.max_steps
    step_size: int = MISSING  # step schedule: decay every step_size steps
    gamma: float = MISSING  # step schedule: decay factor

    def __post_init__(self) -> None:
        names = ("constant", "step", "linear", "cosine")
        _check(self.name in names, "schedule.name", self.name, " | ".join(names))
        _check(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an int >= 0")
        _check(self.step_size > 0, "schedule.step_size", self.step_size, "a positive int")


@dataclass
class TrainerConfig:
    max_steps: int = MISSING
    grad_accum_steps: int = MISSING
    grad_clip: float = MISSING
    precision: str = MISSING  # fp32 | bf16 | fp16 (autocast on CUDA; fp16 with a GradScaler)
    channels_last: bool = MISSING
    log_every: int = MISSING  # every reduction and TensorBoard scalar of the loop happens at log steps only
    log_lr_every_step: bool = MISSING  # also the LR at every step (tests of schedules; a TensorBoard write a step)
    eval_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    async_checkpoint: bool = MISSING
    compile: bool = MISSING
    threads: int = MISSING
    straggler_factor: float = MISSING  # a rank's local step time above this times the median is behind
    straggler_windows: int = MISSING  # for this many consecutive log windows: named (workers/straggler.py)
    elastic_commit_every: int = MISSING  # Horovod Elastic: steps between in-memory commits (distributed/elastic.py)

    def __post_init__(self) -> None:
        _check(self.max_steps >= 0, "trainer.max_steps", self.max_steps, "an int >= 0")
        for key in ("grad_accum_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                    "straggler_windows", "elastic_commit_every"):
            value = getattr(self, key)
            _check(value > 0, f"trainer.{key}", value, "a positive int")
        _check(self.precision in ("fp32", "bf16", "fp16"), "trainer.precision", self.precision, "fp32 | bf16 | fp16")
        _check(self.grad_clip >= 0, "trainer.grad_clip", self.grad_clip, "a float >= 0")
        _check(self.threads >= 0, "trainer.threads", self.threads, "an int >= 0")
        _check(self.straggler_factor > 1, "trainer.straggler_factor", self.straggler_factor, "a float > 1")


@dataclass
class OnlineConfig:
    """mode=online: learn from a stream of records as they arrive (workers/data/stream.py, workers/online.py)."""

    source: str = MISSING  # file | shards | synthetic
    path: str | None = MISSING
    format: str = MISSING  # jsonl | csv
    features: int = MISSING  # numbers per record before the label
    classes: int = MISSING  # labels are 0..classes-1
    batch_size: int = MISSING
    poll_s: float = MISSING
    idle_timeout_s: float = MISSING
    checkpoint_every_s: float = MISSING
    window: int = MISSING
    records: int = MISSING

    def __post_init__(self) -> None:
        _check(self.source in ("file", "shards", "synthetic"), "online.source", self.source,
               "file | shards | synthetic")
        _check(self.source == "synthetic" or bool(self.path), "online.path", self.path,
               f"a path for online.source={self.source}")
        _check(self.format in ("jsonl", "csv"), "online.format", self.format, "jsonl | csv")
        _check(self.features > 0 and self.classes > 1, "online.features/classes", (self.features, self.classes),
               "features > 0 and classes > 1")
        _check(self.batch_size > 0, "online.batch_size", self.batch_size, "a positive int")
        _check(self.poll_s > 0, "online.poll_s", self.poll_s, "a positive float")
        _check(self.idle_timeout_s >= 0, "online.idle_timeout_s", self.idle_timeout_s, "a float >= 0")
        _check(self.window > 0, "online.window", self.window, "a positive int")


@dataclass
class DDPConfig:
    """DistributedDataParallel knobs (ignored by the Horovod and single-process paths)."""

    bucket_cap_mb: float = MISSING
    gradient_as_bucket_view: bool = MISSING
    static_graph: bool = MISSING


@dataclass
class Config:
    model: dict[str, Any] = MISSING
    data: dict[str, Any] = MISSING
    loss: dict[str, Any] = MISSING
    metrics: dict[str, Any] = MISSING
    optimizer: dict[str, Any] = MISSING
    schedule: ScheduleConfig = MISSING
    trainer: TrainerConfig = MISSING
    ddp: DDPConfig = MISSING
    online: OnlineConfig = MISSING
    seed: int = MISSING
    mode: str = MISSING  # batch | online

    def __post_init__(self) -> None:
        for key in ("model", "data", "loss", "optimizer"):
            _check_target(getattr(self, key), key)
        for name, node in self.metrics.items():
            _check_target(node, f"metrics.{name}")
        d, o = self.data, self.optimizer
        _check(_number(d.get("batch_size"), int) > 0, "data.batch_size", d.get("batch_size"), "a positive int")
        _check(_number(d.get("num_workers"), int) >= 0, "data.num_workers", d.get("num_workers"), "an int >= 0")
        _check(_number(d.get("prefetch_factor"), int) > 0, "data.prefetch_factor", d.get("prefetch_factor"),
               "a positive int")
        _check(_number(o.get("lr"), float) > 0, "optimizer.lr", o.get("lr"), "a positive float")
        _check(self.mode in ("batch", "online"), "mode", self.mode, "batch | online")
        # cross-field checks: what no single group can see
        _check(self.trainer.max_steps > 0 or self.mode == "online", "trainer.max_steps", self.trainer.max_steps,
               "a positive int (0 = unlimited is for mode=online)")
        _check(self.mode == "batch" or self.trainer.grad_accum_steps == 1, "trainer.grad_accum_steps",
               self.trainer.grad_accum_steps, "1 with mode=online (each update is the newest records)")
        _check(self.mode == "batch" or self.trainer.precision != "fp16", "trainer.precision", self.trainer.precision,
               "fp32 or bf16 with mode=online")


def _number(value: Any, kind: type) -> float:
    """``value`` as ``kind`` (int or float), or -1 when it is not one (bools are not numbers here)."""
    ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
    return value if ok and not isinstance(value, bool) else -1


def _check_target(node: Any, key: str) -> None:
    target = node.get("_target_") if isinstance(node, dict) else None
    _check(isinstance(target, str) and bool(re.fullmatch(r"[A-Za-z_][\w.]*", target)), f"{key}._target_", target,
           "a dotted path such as my_pkg.Net (a class or function)")


def kwargs(node: dict[str, Any], own: tuple[str, ...] = ()) -> dict[str, Any]:
    """A `_target_` node's keyword arguments: every key but `_target_` and the trainer's own."""
    return {k: v for k, v in node.items() if k != "_target_" and k not in own}


def from_container(container: Any) -> Config:
    """Typed Config from a DictConfig/dict; raises ConfigError naming the bad key."""
    from omegaconf import OmegaConf

    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), container)
        cfg = OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except Exception as e:  # omegaconf's errors carry the full key and value
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{key}: {msg}" if key else msg) from None
    # dict-typed nodes come back as plain dicts whose lists may still be ListConfig
    for key in ("model", "data", "loss", "metrics", "optimizer"):
        setattr(cfg, key, OmegaConf.to_container(OmegaConf.create(getattr(cfg, key))))
    return cfg  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    """Plain block YAML (no OmegaConf: the launcher writes it on every launch), keys in the schema's order."""
    import yaml

    return yaml.dump(_plain(to_dict(cfg)), Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                     default_flow_style=False, allow_unicode=True)


def _plain(value: Any) -> Any:
    """Tuples as lists, for the safe YAML dumper."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def load(path: str | Path) -> Config:
    """Load a config file, checked against the schema (types included): a run directory's, to compare on resume."""
    from omegaconf import OmegaConf

    return from_container(OmegaConf.load(path))


def load_resolved(path: str | Path) -> Config:
    """The resolved config the launcher wrote into the run directory (:func:`to_yaml` of a checked Config), as
    the ranks read it: plain YAML into the dataclasses, whose own checks run; the types were checked when
    the launcher composed it. Equal to :func:`load` of the same file."""
    import yaml

    with open(path) as f:
        return from_plain(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


def from_plain(d: dict[str, Any]) -> Config:
    """A Config from :func:`to_dict` of a checked Config (plain data: a run directory's YAML, the launcher's compose
    cache), without OmegaConf: the dataclasses' own checks run, the types are as they were checked. A dict of
    another shape raises TypeError or KeyError."""
    return Config(model=d["model"], data=d["data"], loss=d["loss"], metrics=d["metrics"], optimizer=d["optimizer"],
                  schedule=ScheduleConfig(**d["schedule"]), trainer=TrainerConfig(**d["trainer"]),
                  ddp=DDPConfig(**d["ddp"]), online=OnlineConfig(**d["online"]), seed=d["seed"], mode=d["mode"])
