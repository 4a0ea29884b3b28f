"""Fast unit tests: rank info from env, LR schedules, checkpoints, sampler, config composition."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launcher.config.compose import compose_config
from launcher.errors import UsageError
from workers import checkpoint as ck
from workers import config as schema
from workers.config import to_yaml
from workers.data.sampler import ResumableSampler
from workers.distributed.ddp import SingleProcessComm
from workers.distributed.env import DistEnv
from workers.optim import lr_at

ROOT = Path(__file__).resolve().parent.parent


# -- DistEnv.from_env -----------------------------------------------------------------------------
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
            "MASTER_ADDR": "n0", "MASTER_PORT": "1234", "TORCHELASTIC_RESTART_COUNT": "2"}
SLURM = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2(x2)",
         "SLURM_NODEID": "1"}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, DistEnv()),
        ({"PATH": "/bin", "HOME": "/root"}, DistEnv()),  # unrelated variables: still one process
        (TORCHRUN, DistEnv(rank=3, world_size=8, local_rank=1, local_world_size=2, node_rank=1, master_addr="n0",
                           master_port=1234, launched_by="torchrun", restart_count=2)),
        ({"RANK": "1", "WORLD_SIZE": "2"}, DistEnv(rank=1, world_size=2, local_world_size=2,
                                                   launched_by="torchrun")),
        ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"},
         DistEnv(rank=1, world_size=2, local_rank=1, local_world_size=2, launched_by="horovod")),
        ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
          "OMPI_COMM_WORLD_LOCAL_SIZE": "3", "OMPI_COMM_WORLD_NODE_RANK": "1"},
         DistEnv(rank=5, world_size=6, local_rank=2, local_world_size=3, node_rank=1, launched_by="mpi")),
        (SLURM, DistEnv(rank=2, world_size=4, local_rank=0, local_world_size=2, node_rank=1, launched_by="slurm")),
        ({**SLURM, **TORCHRUN}, DistEnv.from_env(TORCHRUN)),  # torchrun inside an allocation: torchrun's ranks
    ],
    ids=["none", "unrelated", "torchrun", "torchrun-minimal", "horovod", "ompi", "slurm", "torchrun-in-slurm"],
)
def test_dist_env_from_env(env: dict[str, str], expected: DistEnv) -> None:
    got = DistEnv.from_env(env)
    assert got == expected
    assert got.is_main == (got.rank == 0)


def test_dist_env_bad_value_names_the_variable() -> None:
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        DistEnv.from_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_no_stray_environ_reads() -> None:
    """Rank info is read from the environment once (train.py -> distributed/env.py, rank.py at the rank's start, which
    also hands LAUNCHER_HOOKS to workers/hooks.py); the launcher reads it at its edges (cli.py and single.py pass
    it to the pure planner, supervisor.py to children)."""
    allowed = {"env.py", "train.py", "rank.py", "mpi_env.py", "cli.py", "single.py", "supervisor.py",
               "probe.py"}  # probe.py: its own process on each host (-m launcher.preflight.probe), gloo reads env
    offenders = [p for d in ("workers", "launcher") for p in (ROOT / d).rglob("*.py")
                 if p.name not in allowed and ("os.environ" in p.read_text() or "os.getenv" in p.read_text())]
    assert offenders == []


def test_no_test_or_bench_code_in_the_product() -> None:
    """launcher/ and workers/ import neither bench nor the tests: their knobs reach the ranks through
    LAUNCHER_HOOKS (workers/hooks.py), and the wheel ships neither."""
    imported = []
    for path in [p for d in ("workers", "launcher") for p in (ROOT / d).rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            imported += [f"{path.relative_to(ROOT)}: {n}" for n in names
                         if n.split(".")[0] in ("bench", "tests", "conftest", "rank_hooks")]
    assert imported == []


# -- learning-rate schedules ----------------------------------------------------------------------
PEAK, MAX_STEPS = 1.0, 100


def ScheduleConfig(**kw: object) -> schema.ScheduleConfig:  # noqa: N802 - reads like the dataclass it builds
    """The schedule with configs/config.yaml's base values for the keys not given."""
    base = {"warmup_steps": 0, "min_lr": 0.0, "total_steps": None, "step_size": 100, "gamma": 0.5}
    return schema.ScheduleConfig(**{**base, **kw})  # type: ignore[arg-type]


CONSTANT = ScheduleConfig(name="constant", warmup_steps=10)
STEP = ScheduleConfig(name="step", step_size=10, gamma=0.5)
LINEAR = ScheduleConfig(name="linear", warmup_steps=10, min_lr=0.1)
COSINE = ScheduleConfig(name="cosine", warmup_steps=10, min_lr=0.0)


@pytest.mark.parametrize(
    ("sched", "step", "expected"),
    [
        (ScheduleConfig(name="constant"), 0, PEAK),
        (CONSTANT, 0, 0.1),  # warmup: peak * (step + 1) / warmup_steps
        (CONSTANT, 4, 0.5),
        (CONSTANT, 9, PEAK),  # warmup end
        (CONSTANT, 50, PEAK),
        (CONSTANT, 99, PEAK),
        (STEP, 9, PEAK),  # end of the first interval
        (STEP, 10, 0.5),
        (STEP, 25, 0.25),  # mid-decay: gamma ** (25 // 10)
        (STEP, 99, 0.5**9),  # end
        (LINEAR, 9, PEAK),  # warmup end
        (LINEAR, 10, PEAK),  # decay starts at the peak
        (LINEAR, 55, 0.1 + 0.9 * 0.5),  # mid-decay: halfway from warmup end (10) to max_steps (100)
        (LINEAR, 100, 0.1),  # end
        (LINEAR, 150, 0.1),  # past the horizon: stays at min_lr
        (COSINE, 9, PEAK),
        (COSINE, 10, PEAK),
        (COSINE, 55, 0.5),  # mid-decay
        (COSINE, 100, 0.0),
        (ScheduleConfig(name="cosine", warmup_steps=0, min_lr=0.2, total_steps=40), 10,
         0.2 + 0.4 * (1 + math.cos(math.pi * 0.25))),  # total_steps overrides max_steps
        (ScheduleConfig(name="cosine", warmup_steps=0, min_lr=0.2, total_steps=40), 40, 0.2),
    ],
)
def test_lr_schedules_match_formulas(sched: ScheduleConfig, step: int, expected: float) -> None:
    assert lr_at(step, PEAK, sched, max_steps=MAX_STEPS) == pytest.approx(expected)


@pytest.mark.parametrize("sched", [CONSTANT, STEP, LINEAR, COSINE], ids=lambda s: s.name)
def test_lr_rises_during_warmup_then_never_rises(sched: ScheduleConfig) -> None:
    lrs = [lr_at(s, PEAK, sched, MAX_STEPS) for s in range(MAX_STEPS)]
    w = sched.warmup_steps
    assert all(a < b for a, b in zip(lrs[:w], lrs[1:w], strict=False))
    assert all(a >= b for a, b in zip(lrs[w:], lrs[w + 1 :], strict=False))
    assert max(lrs) == pytest.approx(PEAK) and min(lrs) > 0


# -- checkpoints ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("step", "last", "every", "expected"),
                         [(50, False, 50, True), (100, False, 50, True), (51, False, 50, False),
                          (49, False, 50, False), (51, True, 50, True), (1, False, 1, True), (7, True, 1000, True)])
def test_should_save(step: int, last: bool, every: int, expected: bool) -> None:
    assert ck.should_save(step, last, every) is expected


def _manager(directory: Path, keep: int = 2, async_save: bool = False, every: int = 1) -> ck.CheckpointManager:
    return ck.CheckpointManager(directory, SingleProcessComm(DistEnv()), every=every, keep=keep,
                                meta={"world_size": 1}, async_save=async_save)


def _state(value: float) -> dict:
    return {ck.MODEL: {"w": torch.full((3,), value), "b": torch.arange(4)},
            ck.TRAIN_STATE: {"step": int(value), "epoch": 0, "epoch_pos": 64}}


@pytest.mark.parametrize("async_save", [False, True])
def test_checkpoint_round_trip_keep_k_and_fallback(tmp_path: Path, async_save: bool) -> None:
    m = _manager(tmp_path, keep=2, async_save=async_save)
    for step in (1, 2, 3):
        m.save(step, last_step=False, state=lambda s=step: _state(float(s)))
    m.wait()
    assert ck.list_steps(tmp_path) == [3, 2]  # keep the newest 2: step 1 purged, .pt and manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002.json", "step-00000002.pt",
                                                          "step-00000003.json", "step-00000003.pt"]
    assert ck.verify(tmp_path, 3) is None and ck.verify(tmp_path, 2) is None
    loaded = m.load()
    assert torch.equal(loaded[ck.MODEL]["w"], torch.full((3,), 3.0))
    assert torch.equal(loaded[ck.MODEL]["b"], torch.arange(4))
    assert loaded[ck.TRAIN_STATE] == {"step": 3, "epoch": 0, "epoch_pos": 64}
    assert loaded[ck.META]["step"] == 3 and loaded[ck.META]["world_size"] == 1
    manifest = json.loads(ck.ckpt_path(tmp_path, 3).with_suffix(".json").read_text())
    assert manifest["size"] == ck.ckpt_path(tmp_path, 3).stat().st_size and len(manifest["sha256"]) == 64

    newest = ck.ckpt_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:-10])  # truncate the newest
    warnings: list[str] = []
    assert ck.latest_valid(tmp_path, warnings.append) == 2
    assert len(warnings) == 1 and "step-00000003.pt is unusable (size differs" in warnings[0]
    assert torch.equal(m.load()[ck.MODEL]["w"], torch.full((3,), 2.0))
    with pytest.raises(ck.CheckpointError, match="step 3"):
        m.load(step=3)  # an explicit step that is damaged is an error, not a silent fallback


def test_checkpoint_fallback_warns_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = _manager(tmp_path, keep=3)
    for step in (1, 2):
        m.save(step, last_step=False, state=lambda s=step: _state(float(s)))
    newest = ck.ckpt_path(tmp_path, 2)
    newest.write_bytes(b"x" * newest.stat().st_size)  # same size, wrong bytes
    assert m.load()[ck.TRAIN_STATE]["step"] == 1
    err = capsys.readouterr().err
    assert "WARNING:" in err and "step-00000002.pt is unusable (sha256 differs" in err


def test_checkpoint_only_when_due(tmp_path: Path) -> None:
    m = _manager(tmp_path, keep=10, every=20)
    for step in range(1, 51):
        m.save(step, last_step=step == 50, state=lambda s=step: _state(float(s)))
    assert ck.list_steps(tmp_path) == [50, 40, 20]


def test_checkpoint_without_manifest_does_not_count(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    m.save(1, last_step=True, state=lambda: {"x": 1})
    ck.ckpt_path(tmp_path, 2).write_bytes(b"half a save")  # a crash before the manifest
    assert ck.latest_valid(tmp_path, lambda _: None) == 1


def test_no_checkpoint_loads_none(tmp_path: Path) -> None:
    assert _manager(tmp_path / "absent").load() is None


def test_checkpoint_loads_are_weights_only(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (print, ("pwned",))

    m = _manager(tmp_path)
    m.save(1, last_step=True, state=lambda: {"x": Evil()})
    with pytest.raises(Exception, match="Weights only load failed"):
        m.load()


# -- the resumable sampler ------------------------------------------------------------------------
N, SEED, EPOCH = 103, 5, 2  # 103: not a multiple of any world size, so drop_last has something to drop


def _shuffled() -> list[int]:
    """The epoch's order as DistributedSampler defines it: randperm seeded with seed + epoch."""
    return torch.randperm(N, generator=torch.Generator().manual_seed(SEED + EPOCH)).tolist()


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("start", [0, 8, 40, 96, 6], ids=lambda s: f"start{s}")
def test_sampler_ranks_cover_the_shuffled_order_from_the_offset(world: int, start: int) -> None:
    per_rank = []
    for rank in range(world):
        s = ResumableSampler(list(range(N)), world, rank, SEED)
        s.set_epoch(EPOCH, start=start)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s)
    assert len({len(r) for r in per_rank}) == 1  # equal shares: no rank waits on a missing step
    # rank r takes every world-th sample, so interleaving the ranks gives back the global order
    union = [i for group in zip(*per_rank, strict=True) for i in group]
    assert len(union) == len(set(union))  # no duplicates
    order = _shuffled()
    assert union == order[start : start + len(union)]  # nothing skipped, in the shuffled order
    dropped = N - start - len(union)
    # drop_last: only a remainder is left out (< world; < 2 * world when resuming from another world
    # size's offset, which need not be a multiple of this one)
    assert 0 <= dropped < (world if start % world == 0 else 2 * world)


def test_sampler_epochs_reshuffle_deterministically() -> None:
    def order(epoch: int) -> list[int]:
        s = ResumableSampler(list(range(N)), 1, 0, SEED)
        s.set_epoch(epoch)
        return list(s)

    assert order(0) == order(0) and order(0) != order(1)
    assert sorted(order(3)) == list(range(N))


# -- config composition ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], {"model._target_": "workers.models.mlp.MLP", "data._target_": "workers.data.builtin.digits",
              "optimizer._target_": "torch.optim.Adam", "schedule.name": "constant", "trainer.max_steps": 500,
              "model.hidden": 128, "loss._target_": "workers.metrics.cross_entropy"}),
        (["optimizer=sgd", "optimizer.lr=0.05", "trainer.max_steps=300"],
         {"optimizer._target_": "torch.optim.SGD", "optimizer.lr": 0.05, "optimizer.momentum": 0.9,
          "trainer.max_steps": 300}),
        (["schedule=cosine", "schedule.warmup_steps=5"], {"schedule.name": "cosine", "schedule.warmup_steps": 5}),
        (["trainer.log_every=1", "trainer.eval_every=100000", "trainer.checkpoint_every=20"],
         {"trainer.log_every": 1, "trainer.eval_every": 100000, "trainer.checkpoint_every": 20}),
        (["data=synthetic", "data.num_samples=256"],
         {"data._target_": "workers.data.builtin.synthetic", "data.num_samples": 256, "data.batch_size": 64}),
        (["optimizer=adamw", "optimizer.betas=[0.9,0.95]"], {"optimizer.betas": [0.9, 0.95]}),
        (["model=gpt", "data=synthetic_tokens", "seed=3"],
         {"model._target_": "workers.models.gpt.GPT", "model.vocab": 512, "model.context": 128, "seed": 3}),
        # a user's target: the preset's keys for the old target go, the command line's stay
        (["model._target_=torch.nn.Linear", "model.in_features=64", "model.out_features=10"],
         {"model": {"_target_": "torch.nn.Linear", "in_features": 64, "out_features": 10}}),
        (["optimizer._target_=torch.optim.RMSprop", "optimizer.alpha=0.9"],
         {"optimizer": {"_target_": "torch.optim.RMSprop", "lr": 0.003, "weight_decay": 0.0, "alpha": 0.9,
                        "scale_lr_with_world_size": False, "decay_norms_and_biases": False}}),
        (["loss._target_=torch.nn.MSELoss", "metrics={}"], {"loss": {"_target_": "torch.nn.MSELoss"}, "metrics": {}}),
    ],
)
def test_compose_good_overrides(overrides: list[str], expected: dict) -> None:
    cfg = compose_config(overrides)
    assert isinstance(cfg, schema.Config)  # typed dataclasses from here on, no DictConfig
    for key, value in expected.items():
        obj = cfg
        for part in key.split("."):
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        assert obj == value, key


def test_resolved_yaml_round_trips_to_the_same_config(tmp_path: Path) -> None:
    """What the launcher writes to RUN_DIR/config.yaml is what every worker loads."""
    cfg = compose_config(["optimizer=sgd", "schedule=linear", "trainer.max_steps=7"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert schema.load(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.foo=1", "trainer.foo"),  # unknown key
        ("+trainer.foo=1", "foo"),
        ("nope=1", "nope"),
        ("trainer.max_steps=abc", "abc"),  # bad type
        ("optimizer.lr=fast", "fast"),
        ("optimizer=nope", "nope"),  # bad group choice
        ("trainer.max_steps=0", "trainer.max_steps=0 is invalid"),  # invalid value
        ("optimizer.lr=-1", "optimizer.lr=-1 is invalid"),
        ("data.num_workers=-1", "data.num_workers=-1 is invalid"),
        ("mode=online trainer.grad_accum_steps=2", "trainer.grad_accum_steps"),  # a cross-field check
        ("trainer.precision=fp8", "trainer.precision='fp8' is invalid"),
        ("data=tokens", "data.path"),  # a required value left missing
    ],
)
def test_bad_overrides_are_usage_errors(override: str, message: str) -> None:
    with pytest.raises(UsageError) as e:
        compose_config(override.split())
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("bad config override")


def test_config_key_set_snapshot() -> None:
    """New knobs must be deliberate: update this snapshot (and README/config docs) when adding one."""
    keys = sorted(_flat_keys(OmegaConf.to_container(OmegaConf.create(to_yaml(compose_config([]))))))
    assert keys == [
        "data._target_", "data.batch_size", "data.num_workers", "data.persistent_workers", "data.pin_memory",
        "data.prefetch_factor", "data.split_seed", "data.test_fraction", "ddp.bucket_cap_mb",
        "ddp.gradient_as_bucket_view", "ddp.static_graph", "loss._target_", "metrics.accuracy._target_", "mode",
        "model._target_", "model.classes", "model.hidden", "model.inputs", "online.batch_size",
        "online.checkpoint_every_s", "online.classes", "online.features", "online.format", "online.idle_timeout_s",
        "online.path", "online.poll_s", "online.records", "online.source", "online.window", "optimizer._target_",
        "optimizer.betas", "optimizer.decay_norms_and_biases", "optimizer.lr", "optimizer.scale_lr_with_world_size",
        "optimizer.weight_decay", "schedule.gamma", "schedule.min_lr", "schedule.name", "schedule.step_size",
        "schedule.total_steps", "schedule.warmup_steps", "seed", "trainer.async_checkpoint", "trainer.channels_last",
        "trainer.checkpoint_every", "trainer.compile", "trainer.elastic_commit_every", "trainer.eval_every",
        "trainer.grad_accum_steps",
        "trainer.grad_clip", "trainer.keep_checkpoints", "trainer.log_every", "trainer.log_lr_every_step",
        "trainer.max_steps",
        "trainer.precision", "trainer.straggler_factor", "trainer.straggler_windows", "trainer.threads",
    ]


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


# -- pre-flight -----------------------------------------------------------------------------------
def test_preflight_finds_disagreeing_nodes() -> None:
    from workers.distributed.topology import problems, table

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


# -- online streams ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "fmt", "expected"),
    [('{"x": [1, 2, 3], "y": 2}', "jsonl", ([1.0, 2.0, 3.0], 2)), ("[0.5, 0, 1, 1]", "jsonl", ([0.5, 0.0, 1.0], 1)),
     ("0.5,0,1,0", "csv", ([0.5, 0.0, 1.0], 0))],
)
def test_stream_record_formats(line: str, fmt: str, expected: tuple) -> None:
    from workers.data.stream import parse

    assert parse(line, fmt, 3, 4) == expected


@pytest.mark.parametrize(("line", "fmt", "why"), [
    ("nope", "jsonl", "cannot parse"), ('{"x": [1, 2]}', "jsonl", "cannot parse"), ("[1, 2, 3, 4, 5]", "jsonl",
                                                                                  "4 features, expected 3"),
    ('{"x": [1, 2, 3], "y": 7}', "jsonl", "label 7 is not a class"), ("1,2,3,1.5", "csv", "label 1.5"),
    ("1,a,3,1", "csv", "cannot parse")])
def test_stream_bad_records(line: str, fmt: str, why: str) -> None:
    from workers.data.stream import BadRecord, parse

    with pytest.raises(BadRecord, match=why):
        parse(line, fmt, 3, 4)


def test_stream_resume_on_another_world_size_skips_what_was_trained() -> None:
    from workers.data.stream import resume_point

    # 2 ranks had trained records 0,2,4 (rank 0 next at 6) and 1,3 (rank 1 next at 5)
    saved = [{"index": 6, "line": 7, "shard": "", "offset": 70}, {"index": 5, "line": 6, "shard": "", "offset": 60}]
    start, skip = resume_point(saved, 2, 1)
    assert (start.index, start.offset, skip(5)) == (5, 60, False)  # same world size: its own position
    start, skip = resume_point(saved, 3, 0)  # 3 ranks now: all read from the earliest position ...
    assert start.index == 5 and start.offset == 60
    assert [i for i in range(5, 9) if skip(i)] == []  # ... and 5 (rank 1's next), 6, 7, 8 are all untrained
    start, skip = resume_point([{"index": 9, "line": 9, "shard": "", "offset": 90},
                                {"index": 4, "line": 4, "shard": "", "offset": 40}], 1, 0)
    assert start.index == 4 and [i for i in range(4, 10) if not skip(i)] == [5, 7, 9]  # 4, 6, 8: old rank 0's


@pytest.mark.parametrize(("backend", "tag0", "tag1"), [("mpi", "[1,0]", "[1,1]"), ("horovod", "[0]", "[1]")])
def test_runner_rank_tags_become_rank_prefixes_even_mid_line(backend: str, tag0: str, tag1: str) -> None:
    """The runner's stdout and stderr share the launcher's pipe, so one rank's tag can land mid-line."""
    import io
    import sys

    from launcher.plan.planner import plan_launch
    from launcher.plan.types import Cmd, LaunchOptions
    from launcher.supervise.supervisor import Supervisor

    plan = plan_launch(LaunchOptions(run_dir=Path("/r"), backend=backend, gpus=2), device_count=0, free_port=1,
                       cpu_count=2, python=sys.executable, env={}, is_root=False)
    text = f"{tag0}<stdout>:step 1{tag1}<stderr>:warn\n{tag1}<stdout>:step 1\nthe runner's own line\n"
    out = io.StringIO()
    cmd = Cmd(argv=(sys.executable, "-c", f"print({text!r}, end='')"), relabel=plan.commands[0].relabel)
    assert Supervisor([cmd], out=out).run() == 0
    assert out.getvalue().splitlines() == ["[rank0]:step 1", "[rank1]:warn", "[rank1]:step 1", "the runner's own line"]
