"""Straggler detection (workers/straggler.py): the median / consecutive-window rule on its own, then real
2-rank runs where rank 1's input pipeline is slowed by a test knob (LAUNCHER_TEST_SLOW_DATA_S + _SLOW_RANK,
tests/rank_hooks.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import rank_hooks
import torch
import torch.distributed as dist
from conftest import ROOT, finish, start, tb_scalars
from torch import nn

from launcher.config.hydra import compose
from workers.config import ConfigError
from workers.straggler import MAX_LINES, StragglerDetector, forward_waits, median

MS = 1e-3
has_horovod = shutil.which("horovodrun") is not None and importlib.util.find_spec("horovod") is not None


def judge(detector: StragglerDetector, *windows: list[float]) -> list[list[str]]:
    """The console lines of each window (times in ms)."""
    return [detector.judge([t * MS for t in times])[1] for times in windows]


def test_lower_median() -> None:
    assert median([3.0]) == 3.0
    assert median([5.0, 1.0]) == 1.0  # 2 ranks: the slow one is compared with the other
    assert median([4.0, 1.0, 9.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 9.0]) == 4.0


def test_named_after_consecutive_windows_once_and_again_after_recovering() -> None:
    d = StragglerDetector(factor=1.5, windows=3)
    d.hosts = ["a", "b", "c"]
    slow, fine = [10, 31, 10], [10, 11, 10]
    lines = judge(d, slow, slow, slow, slow, slow)
    assert lines[:2] == [[], []]
    assert lines[2] == ["straggler: rank 1 (b) local step time 31.0 ms is 3.1x the median 10.0 ms for 3 log windows"]
    assert lines[3:] == [[], []]  # once, not every window
    assert judge(d, slow, slow, fine, slow, slow) == [[]] * 5  # the run of windows starts over
    assert judge(d, slow) == [[lines[2][0]]]  # behind again for 3 windows in a row: named again


def test_threshold_factor_and_minimum_gap() -> None:
    d = StragglerDetector(factor=1.5, windows=1)
    assert judge(d, [10, 14.9, 10]) == [[]]  # 1.49x
    assert judge(d, [10, 15.1, 10])[0][0].startswith("straggler: rank 1 local step time 15.1 ms is 1.5x")
    d = StragglerDetector(factor=1.5, windows=1)
    assert judge(d, [0.2, 1.0, 0.2]) == [[]]  # 5x, but 0.8 ms: noise on tiny steps
    assert judge(d, [0.2, 1.3, 0.2]) != [[]]


def test_scalars_name_the_slowest_rank() -> None:
    d = StragglerDetector(factor=1.5, windows=3)
    scalars, _ = d.judge([0.010, 0.012, 0.040, 0.010])
    assert scalars == pytest.approx({"straggler/max_ratio": 4.0, "straggler/rank": 2.0, "straggler/max_ms": 40.0,
                                     "straggler/median_ms": 10.0})


def test_a_rank_without_steps_in_the_window_is_left_out() -> None:
    """Under torchft a group out of the quorum (dead, healing) reports 0: it is neither the median nor judged."""
    d = StragglerDetector(factor=1.5, windows=1)
    assert judge(d, [1.0, 0.0]) == [[]]  # alone: nobody to compare with (it was "infx the median 0.0 ms")
    assert judge(d, [10, 0.0, 31])[0] == ["straggler: rank 2 local step time 31.0 ms is 3.1x the median 10.0 ms "
                                          "for 1 log windows"]
    scalars, _ = d.judge([0.0, 0.0])
    assert scalars["straggler/max_ratio"] == 1.0


def test_the_log_step_sums_count_the_ranks_that_were_averaged() -> None:
    """torchft averages over the groups in the quorum, not the world size: the sums must use that count."""
    from workers.distributed.comm import agree

    class Quorum(FakeComm):
        def allreduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
            return tensor / 2  # two of the three groups in the quorum, each with these values

        def averaged_over(self) -> int:
            return 2

    loss, (sums,) = agree(Quorum(), torch.tensor(3.0), [1.0, 2.0, 0.0])
    assert loss == 1.5 and sums == [1.0, 2.0, 0.0]


def test_many_stragglers_are_counted_not_listed() -> None:
    d = StragglerDetector(factor=1.5, windows=1)
    times = [10.0] * 10 + [50.0] * (MAX_LINES + 3)
    (lines,) = judge(d, times)
    assert len(lines) == MAX_LINES + 1 and lines[-1] == "straggler: and 3 more rank(s)"


class FakeComm:
    """Rank ``rank`` of three."""

    world_size, device = 3, torch.device("cpu")

    def __init__(self, rank: int = 0) -> None:
        self.rank, self.is_main = rank, rank == 0


def test_local_puts_the_window_mean_in_this_ranks_place_and_counts_forward_unless_it_waits() -> None:
    """Summed over the ranks (the log step's all-reduce), the vectors are every rank's mean: no collective here."""
    lines: list[str] = []
    d = StragglerDetector(factor=1.5, windows=1, say=lines.append, hosts=["h0", "h1", "h2"])
    for _ in range(4):
        d.add(data_s=0.001, forward_s=0.002)
    mine = d.local(FakeComm(rank=1))
    assert mine == [0.0, pytest.approx(0.003), 0.0] and (d.local_s, d.steps) == (0.0, 0)  # reset for the next
    summed = [a + b for a, b in zip(mine, [0.002, 0.0, 0.050], strict=True)]  # + the other ranks' vectors
    assert d.check(FakeComm(rank=1), summed) == {} and lines == []  # only rank 0 judges
    scalars = d.check(FakeComm(rank=0), summed)
    assert scalars["straggler/rank"] == 2 and lines and lines[0].startswith("straggler: rank 2 (h2)")
    d.count_forward = False  # a forward that holds a collective: only the data part is this rank's
    d.add(data_s=0.001, forward_s=0.5)
    assert d.local(FakeComm(rank=0)) == [pytest.approx(0.001), 0.0, 0.0]


def test_single_rank_checks_nothing() -> None:
    class One(FakeComm):
        world_size = 1

    d = StragglerDetector(factor=1.5, windows=1)
    d.add(0.1, 0.1)
    assert d.local(One()) == [] and d.check(One(), []) == {}


def test_slow_rank_hook_picks_one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rank_hooks.slowed(0, 0.5) == rank_hooks.slowed(1, 0.5) == 0.5  # unset: every rank
    monkeypatch.setattr(rank_hooks, "SLOW_RANK", 1)
    assert (rank_hooks.slowed(0, 0.5), rank_hooks.slowed(1, 0.5)) == (0.0, 0.5)


def test_config_keys_are_checked() -> None:
    cfg = compose([], ROOT / "configs")
    assert (cfg.trainer.straggler_factor, cfg.trainer.straggler_windows) == (1.5, 3)
    with pytest.raises(ConfigError, match="trainer.straggler_factor"):
        compose(["trainer.straggler_factor=1.0"], ROOT / "configs")
    with pytest.raises(ConfigError, match="trainer.straggler_windows"):
        compose(["trainer.straggler_windows=0"], ROOT / "configs")


def test_forward_waits_when_ddp_broadcasts_buffers(tmp_path: Path) -> None:
    """DDP (a real 1-rank gloo group) syncs BatchNorm statistics at the start of forward: not local time."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        assert forward_waits(nn.parallel.DistributedDataParallel(bn))
        assert not forward_waits(nn.parallel.DistributedDataParallel(nn.Linear(4, 4)))
        assert not forward_waits(bn)
    finally:
        dist.destroy_process_group()


# -- real runs -------------------------------------------------------------------------------------
RUN = ["trainer.max_steps=40", "trainer.log_every=5", "trainer.eval_every=1000", "trainer.checkpoint_every=1000"]
SLOW_RANK_1 = {"LAUNCHER_TEST_SLOW_DATA_S": "0.05", "LAUNCHER_TEST_SLOW_RANK": "1"}


def launch(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    code, out, err = finish(start(run_dir, *args, env=env))
    assert code == 0, f"exit {code}\n{out[-3000:]}\n{err[-3000:]}"
    return out


def assert_rank_1_named(run_dir: Path, out: str) -> None:
    named = [ln for ln in out.splitlines() if "straggler:" in ln]
    assert len(named) == 1 and "straggler: rank 1 (" in named[0], out[-3000:]
    assert "for 3 log windows" in named[0]
    tb = tb_scalars(run_dir)
    later = [(s, v) for s, v in tb["straggler/rank"] if s >= 15]
    assert later and all(v == 1 for _, v in later), tb["straggler/rank"]
    assert all(v > 1.5 for s, v in tb["straggler/max_ratio"] if s >= 15), tb["straggler/max_ratio"]


@pytest.mark.slow
def test_slow_input_pipeline_on_rank_1_is_named(tmp_path: Path) -> None:
    out = launch(tmp_path, *RUN, env=SLOW_RANK_1)
    assert_rank_1_named(tmp_path, out)


@pytest.mark.slow
def test_named_when_ddp_syncs_batchnorm_buffers_in_forward(tmp_path: Path) -> None:
    """The fast rank waits for the slow one inside DDP's forward (the buffer broadcast): counting the forward
    would make both ranks equally slow; the data part still tells them apart."""
    (tmp_path / "bn_task.py").write_text(
        "from torch import nn\n\n\n"
        "def net(features: int = 64, classes: int = 10) -> nn.Module:\n"
        "    return nn.Sequential(nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, classes))\n")
    out = launch(tmp_path / "run", *RUN, "model._target_=bn_task.net",
                 env={**SLOW_RANK_1, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert_rank_1_named(tmp_path / "run", out)


@pytest.mark.slow
def test_no_straggler_without_one(tmp_path: Path) -> None:
    # every one of the 8 windows would have to be slow: a loaded machine can preempt one rank for a few
    out = launch(tmp_path, *RUN, "trainer.straggler_windows=8")
    assert "straggler:" not in out
    ratios = tb_scalars(tmp_path)["straggler/max_ratio"]
    assert [s for s, _ in ratios] == list(range(5, 41, 5))  # logged at every log step all the same


@pytest.mark.slow
@pytest.mark.horovod
@pytest.mark.skipif(not has_horovod, reason="needs horovod: bash scripts/install_horovod.sh")
def test_horovod_names_the_straggler(tmp_path: Path) -> None:
    out = launch(tmp_path, "--backend", "horovod", *RUN, env=SLOW_RANK_1)
    assert_rank_1_named(tmp_path, out)
