"""Benchmarks are not tests: these only check that each suite runs tiny and writes the expected JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import SUITES, main

EXPECTED = {
    "overhead": {"samples_per_s", "time_to_first_step_s", "ratio_steps_per_s", "ratio_time_to_first_step", "goals",
                 "step_overhead_us", "launcher_startup_s", "profile", "interleaved_one_rank",
                 "ratio_steps_per_s_from_step_cost"},
    "backends": {"samples_per_s", "ratio_to_torchrun", "bare_samples_per_s", "ratio_to_bare", "goals"},
    "scaling": {"samples_per_s", "efficiency", "note"},
    "allreduce": {"backend", "sizes", "memcpy_GBps"},
    "checkpoint": {"stall_s", "state_mb", "ratio_async_to_sync"},
    "lm": {"tokens_per_s", "mfu", "fastest", "flops_per_token", "device", "peak_flops_per_rank"},
    "recovery": {"recovery_s", "hang_summary_s", "hang_exit_s", "goals", "medians", "met", "breakdown_s"},
    "elastic_commit": {"probe", "medians_s", "commit_cost_s", "step_s", "rates", "chosen", "config_default",
                       "default_to_chosen", "goals"},
}


def test_flops_per_token_matches_a_hand_count() -> None:
    """V=10, T=4, L=1, d=8: matmul weights 12*1*8*8 + 10*8 = 848 -> 6*848 = 5088; attention 12*1*4*8 = 384."""
    from workers.models.gpt import GPT, flops_per_token

    model = GPT(vocab=10, context=4, layers=1, heads=2, width=8)
    assert flops_per_token(model) == 5088 + 384
    # the formula's weight count is the model's matmul weights (embeddings are lookups, the head is tied)
    matmul = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
                 and not n.startswith(("tok.", "pos.")))
    assert matmul + 10 * 8 == 12 * 8 * 8 + 10 * 8


def test_check_flags_short_results_and_regenerates_the_readme(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m bench check` on given JSON: goals from the JSON (or the fallback for older results), the
    README block rewritten between its markers and nothing else."""
    results = tmp_path / "results"
    (results / "gpu").mkdir(parents=True)
    stat = lambda m: {"median": m, "min": m, "max": m, "runs": [m]}  # noqa: E731
    records = {
        results / "backends.json": {"suite": "backends", "time": "2026-01-02T03:04:05", "machine": "box: 2 cores",
                                    "ratio_to_bare": {"torchrun": 0.99, "horovod": 0.81},
                                    "goals": {"ratio_to_bare.torchrun": ">= 0.97", "ratio_to_bare.horovod": ">= 0.97"}},
        results / "overhead.json": {"suite": "overhead", "time": "t", "ratio_steps_per_s": 0.995,  # no "goals"
                                    "ratio_time_to_first_step": 1.3},
        results / "recovery.json": {"suite": "recovery", "time": "t", "goals": {"recovery_s": 5.0, "note": "words"},
                                    "recovery_s": {"backoff 1 s": stat(3.0), "backoff 0 s": stat(2.0)}},
        results / "scaling.json": {"suite": "scaling", "time": "t", "efficiency": {"2 ranks": 0.3}},
        results / "gpu" / "lm.json": {"suite": "lm", "time": "t", "device": "NVIDIA H100", "fastest": "default",
                                      "mfu": {"default": 0.35}},
    }
    records[results / "gpu" / "device.json"] = {"gpus": [{"name": "NVIDIA H100"}]}  # not a suite's result
    for path, record in records.items():
        path.write_text(json.dumps(record))
    readme = tmp_path / "README.md"
    readme.write_text("# x\nprose before\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nprose after\n")

    assert main(["check", "--results", str(results), "--readme", str(readme)]) == 0
    short = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("short:")]
    assert [ln.split()[1:3] for ln in short] == [["backends", "ratio_to_bare.horovod"],
                                                  ["overhead", "ratio_time_to_first_step"],
                                                  ["gpu/lm", "mfu.default"]]
    text = readme.read_text()
    assert text.startswith("# x\nprose before\n<!-- bench:begin -->\n")
    assert text.endswith("<!-- bench:end -->\nprose after\n")
    assert "old table" not in text
    assert "| backends | `ratio_to_bare.horovod` | 0.81 | ≥ 0.97 | **short** | 2026-01-02 03:04, box: 2 cores |" in text
    assert "| recovery | `recovery_s` | 3 | ≤ 5 | ok |" in text
    assert "No goals: scaling" in text
    main(["check", "--results", str(results), "--readme", str(readme)])
    assert readme.read_text() == text  # the same JSON, the same README


def test_elastic_commit_interval_weighs_commit_cost_against_redone_steps() -> None:
    """A commit of 8.5 ms, a step of 4 ms, a failure every 20 s: overhead(K) = 8.5/(4K) + 0.05 * 0.004 * K/2;
    Young's optimum sqrt(2 * 0.0085 / 0.05) / 0.004 = 145.8 steps. Near it the curve is flat: 200 costs 3.06 %,
    100 3.12 %, 50 4.75 %."""
    from bench.elastic_commit_suite import choose_interval, optimum, overhead

    commit, step, rate = 0.0085, 0.004, 0.05
    assert overhead(commit, step, rate, 10) == pytest.approx(0.2125 + 0.001)
    assert overhead(commit, step, rate, 200) == pytest.approx(0.030625)
    assert optimum(commit, step, rate) == pytest.approx(145.8, abs=0.1)
    assert choose_interval(commit, step, rate) == 200
    assert choose_interval(commit, step, rate, (10, 50, 100)) == 100
    # rarer failures, a longer interval; a commit as cheap as nothing, every step
    assert choose_interval(commit, step, 1 / 3600) == 2000
    assert choose_interval(1e-9, step, rate) == 1


def test_every_suite_has_expectations() -> None:
    # data has its own tests (tests/test_bench_data.py); goodput takes minutes even tiny (four runs of a window
    # with failures): what it measures is tested in tests/test_torchft.py and tests/test_horovod_elastic.py, the
    # suites are run for the README
    assert set(SUITES) == set(EXPECTED) | {"data", "goodput", "goodput_lm", "goodput_horovod"}


def test_elastic_commit_default_is_the_measured_choice() -> None:
    """configs/trainer/default.yaml's trainer.elastic_commit_every is the K the recorded elastic_commit run chose
    (a new run that chooses another K is a change to the default, or to the README's account of it)."""
    from bench.elastic_commit_suite import config_default

    record = json.loads((Path(__file__).parents[1] / "bench" / "results" / "elastic_commit.json").read_text())
    assert not record["tiny"]
    assert record["chosen"] == record["config_default"] == config_default()


@pytest.mark.slow
@pytest.mark.parametrize("suite", sorted(EXPECTED))
def test_suite_runs_tiny_and_writes_json(suite: str, tmp_path: Path) -> None:
    assert main([suite, "--tiny", "--repeats", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"{suite}.json").read_text())
    assert EXPECTED[suite] <= record.keys()
    assert record["tiny"] is True
    assert (tmp_path / f"{suite}.png").stat().st_size > 1000
    if suite == "overhead":  # the interleaved run timed both loops' steps after the first log window
        same = record["interleaved_one_rank"]
        assert same["steps"] >= 30 and same["trainer_step_us"] > 0 and same["bare_step_us"] > 0
    if suite == "allreduce":
        assert all(r["busbw_GBps"] > 0 for r in record["sizes"])
        assert record["sizes"][0]["bytes"] == 4096


def test_goodput_sorts_the_stalls_by_the_failure_before_them() -> None:
    from bench.goodput_suite import stalls_by_signal

    failures = [{"time": 10.0, "signal": "SIGKILL"}, {"time": 30.0, "signal": "SIGSTOP"},
                {"time": 50.0, "signal": "SIGKILL"}]
    records = [{"kind": "drop", "time": 10.5, "stall_s": 0.5}, {"kind": "rejoin", "time": 13.0, "stall_s": 0.04},
               {"kind": "drop", "time": 31.0, "stall_s": 1.01}, {"kind": "drop", "time": 50.6, "stall_s": 0.52}]
    assert stalls_by_signal(records, failures) == ([0.5, 0.52], [1.01])
