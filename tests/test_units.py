"""Fast unit tests: rank info from env, LR schedules, checkpoints, sampler, config composition."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launcher.config import compose_config
from launcher.errors import UsageError
from workers import checkpoint as ck
from workers.comm import SingleProcessComm
from workers.config import ScheduleConfig, to_yaml
from workers.dist_env import DistEnv
from workers.optim import lr_at


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, DistEnv()),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
          "MASTER_ADDR": "n0", "MASTER_PORT": "1234", "TORCHELASTIC_RESTART_COUNT": "2"},
         DistEnv(3, 8, 1, 2, 1, "n0", 1234, "torchrun", 2)),
        ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"},
         DistEnv(1, 2, 1, 2, 0, launched_by="horovod")),
        ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
          "OMPI_COMM_WORLD_LOCAL_SIZE": "3", "OMPI_COMM_WORLD_NODE_RANK": "1"},
         DistEnv(5, 6, 2, 3, 1, launched_by="mpi")),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2(x2)",
          "SLURM_NODEID": "1"}, DistEnv(2, 4, 0, 2, 1, launched_by="slurm")),
    ],
)
def test_dist_env_from_env(env: dict[str, str], expected: DistEnv) -> None:
    assert DistEnv.from_env(env) == expected


def test_dist_env_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        DistEnv.from_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_no_stray_environ_reads() -> None:
    """Rank info is read from the environment once (train.py -> dist_env.py); test hooks once (testhooks.py);
    the launcher reads it at its edges (cli.py passes it to the pure planner, supervisor.py to children)."""
    allowed = {"dist_env.py", "train.py", "testhooks.py", "mpi_env.py", "cli.py", "supervisor.py"}
    root = Path(__file__).resolve().parent.parent
    offenders = [p for d in ("workers", "launcher") for p in (root / d).rglob("*.py")
                 if p.name not in allowed and ("os.environ" in p.read_text() or "os.getenv" in p.read_text())]
    assert offenders == []


PEAK = 1.0


@pytest.mark.parametrize(
    ("sched", "step", "expected"),
    [
        (ScheduleConfig(name="constant"), 0, PEAK),
        (ScheduleConfig(name="constant", warmup_steps=10), 4, 0.5),
        (ScheduleConfig(name="step", step_size=10, gamma=0.5), 25, 0.25),
        (ScheduleConfig(name="linear", warmup_steps=10, min_lr=0.1), 9, PEAK),  # warmup end
        (ScheduleConfig(name="linear", warmup_steps=10, min_lr=0.1), 55, 0.1 + 0.9 * 0.5),  # mid-decay
        (ScheduleConfig(name="linear", warmup_steps=10, min_lr=0.1), 100, 0.1),  # end
        (ScheduleConfig(name="cosine", warmup_steps=10, min_lr=0.0), 9, PEAK),
        (ScheduleConfig(name="cosine", warmup_steps=10, min_lr=0.0), 55, 0.5),
        (ScheduleConfig(name="cosine", warmup_steps=10, min_lr=0.0), 100, 0.0),
        (ScheduleConfig(name="cosine", warmup_steps=0, min_lr=0.2, total_steps=40), 10,
         0.2 + 0.4 * (1 + math.cos(math.pi * 0.25))),
    ],
)
def test_lr_schedules_match_formulas(sched: ScheduleConfig, step: int, expected: float) -> None:
    assert lr_at(step, PEAK, sched, max_steps=100) == pytest.approx(expected)


@pytest.mark.parametrize(("step", "last", "every", "expected"), [(50, False, 50, True), (51, False, 50, False),
                                                                 (51, True, 50, True)])
def test_should_save(step: int, last: bool, every: int, expected: bool) -> None:
    assert ck.should_save(step, last, every) is expected


def _manager(directory: Path, keep: int = 2, async_save: bool = False) -> ck.CheckpointManager:
    return ck.CheckpointManager(directory, SingleProcessComm(DistEnv()), every=1, keep=keep, meta={"world_size": 1},
                                async_save=async_save)


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_round_trip_keep_k_and_fallback(tmp_path: Path, async_save: bool) -> None:
    m = _manager(tmp_path, keep=2, async_save=async_save)
    for step in (1, 2, 3):
        m.save(step, last_step=False, state=lambda s=step: {"model": {"w": torch.full((3,), float(s))}})
    m.wait()
    assert ck.list_steps(tmp_path) == [3, 2]  # keep the newest 2
    assert ck.verify(tmp_path, 3) is None and ck.verify(tmp_path, 2) is None
    assert not list(tmp_path.glob("*.tmp"))
    assert torch.equal(m.load()["model"]["w"], torch.full((3,), 3.0))
    newest = ck.ckpt_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:-10])  # truncate
    warnings: list[str] = []
    assert ck.latest_valid(tmp_path, warnings.append) == 2
    assert "step-00000003.pt is unusable (size differs" in warnings[0]
    assert torch.equal(m.load()["model"]["w"], torch.full((3,), 2.0))


def test_checkpoint_without_manifest_does_not_count(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    m.save(1, last_step=True, state=lambda: {"x": 1})
    ck.ckpt_path(tmp_path, 2).write_bytes(b"half a save")  # a crash before the manifest
    assert ck.latest_valid(tmp_path, lambda _: None) == 1


def test_checkpoint_loads_are_weights_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    m = _manager(tmp_path)
    m.save(1, last_step=True, state=lambda: {"x": Evil()})
    with pytest.raises(Exception, match="Weights only load failed"):
        m.load()


def test_compose_default_config() -> None:
    cfg = compose_config([])
    assert (cfg.model.name, cfg.data.name, cfg.optimizer.name, cfg.schedule.name) == ("mlp", "digits", "adam",
                                                                                      "constant")
    cfg = compose_config(["optimizer=sgd", "optimizer.lr=0.05", "trainer.max_steps=300", "schedule=cosine"])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.trainer.max_steps) == ("sgd", 0.05,
                                                                                                     0.9, 300)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.foo=1", "trainer.foo"),
        ("trainer.max_steps=abc", "abc"),
        ("optimizer=nope", "nope"),
        ("trainer.max_steps=0", "trainer.max_steps=0 is invalid"),
        ("+trainer.foo=1", "foo"),
        ("optimizer.nesterov=true", "optimizer.nesterov"),  # adam has no momentum
    ],
)
def test_bad_overrides_are_usage_errors(override: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        compose_config([override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_key_set_snapshot() -> None:
    """New knobs must be deliberate: update this snapshot (and README/config docs) when adding one."""
    keys = sorted(_flat_keys(OmegaConf.to_container(OmegaConf.create(to_yaml(compose_config([]))))))
    assert keys == [
        "data.batch_size", "data.context", "data.name", "data.num_classes", "data.num_features", "data.num_samples",
        "data.path", "data.split_seed", "data.test_fraction", "data.vocab_size", "ddp.bucket_cap_mb",
        "ddp.gradient_as_bucket_view", "ddp.static_graph", "mode", "model.heads", "model.hidden", "model.layers",
        "model.name", "model.width", "optimizer.betas",
        "optimizer.lr", "optimizer.momentum", "optimizer.name", "optimizer.nesterov",
        "optimizer.scale_lr_with_world_size", "optimizer.weight_decay", "schedule.gamma", "schedule.min_lr",
        "schedule.name", "schedule.step_size", "schedule.total_steps", "schedule.warmup_steps",
        "seed", "trainer.async_checkpoint", "trainer.checkpoint_every", "trainer.compile", "trainer.eval_every",
        "trainer.grad_accum_steps", "trainer.grad_clip", "trainer.keep_checkpoints", "trainer.log_every",
        "trainer.max_steps", "trainer.precision", "trainer.threads",
    ]


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def test_preflight_finds_disagreeing_nodes() -> None:
    from workers.preflight import problems, table

    good = [{"rank": r, "local_rank": r % 2, "host": f"n{r // 2}", "gpus": 2, "torch": "2.13.0", "nccl": "2.21.5"}
            for r in range(4)]
    assert problems(good, 2, "cuda") == []
    assert "n1" in table(good) and table(good).splitlines()[0].split()[:3] == ["rank", "local_rank", "host"]
    odd = [dict(r) for r in good]
    odd[3]["torch"], odd[2]["gpus"] = "2.12.0", 1
    found = problems(odd, 2, "cuda")
    assert any("different torch versions: 2.12.0, 2.13.0" in f for f in found)
    assert any("fewer GPUs than the 2 ranks per node on: n1" in f for f in found)
    assert problems([{**r, "gpus": 0, "nccl": "-"} for r in good], 2, "cpu") == []
