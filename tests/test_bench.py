"""Benchmarks are not tests: these only check that each suite runs tiny and writes the expected JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.__main__ import SUITES, main

EXPECTED = {
    "overhead": {"samples_per_s", "time_to_first_step_s", "ratio_steps_per_s", "ratio_time_to_first_step"},
    "backends": {"samples_per_s", "ratio_to_torchrun"},
    "scaling": {"samples_per_s", "efficiency", "note"},
    "allreduce": {"backend", "sizes", "memcpy_GBps"},
    "checkpoint": {"stall_s", "state_mb", "ratio_async_to_sync"},
    "lm": {"tokens_per_s", "mfu", "fastest", "flops_per_token", "device", "peak_flops_per_rank"},
    "recovery": {"recovery_s", "hang_summary_s", "hang_exit_s", "goals", "medians", "met", "breakdown_s"},
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


def test_every_suite_has_expectations() -> None:
    assert set(SUITES) == set(EXPECTED) | {"data"}  # data has its own tests: tests/test_bench_data.py


@pytest.mark.slow
@pytest.mark.parametrize("suite", sorted(EXPECTED))
def test_suite_runs_tiny_and_writes_json(suite: str, tmp_path: Path) -> None:
    assert main([suite, "--tiny", "--repeats", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / f"{suite}.json").read_text())
    assert EXPECTED[suite] <= record.keys()
    assert record["tiny"] is True
    assert (tmp_path / f"{suite}.png").stat().st_size > 1000
    if suite == "allreduce":
        assert all(r["busbw_GBps"] > 0 for r in record["sizes"])
        assert record["sizes"][0]["bytes"] == 4096
