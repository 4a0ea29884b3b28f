"""The ``data`` benchmark suite (bench/data_suite.py): its datasets, and a tiny run that writes JSON + PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.__main__ import main
from bench.data_suite import DecodeImages, plain_synthetic
from workers.data.builtin import synthetic


def test_decode_dataset_items_are_mlp_inputs() -> None:
    data = DecodeImages(num_samples=100, image_size=64, distinct=4)
    x, y = data[5]
    assert len(data) == 100 and x.shape == (64,) and x.dtype == torch.float32 and y == 5
    assert torch.equal(data[1][0], data[5][0])  # item i decodes image i % distinct
    assert not torch.equal(data[1][0], data[2][0])


def test_plain_dataset_holds_the_fast_paths_tensors() -> None:
    fast, _ = synthetic(256, 8, 3)
    plain, _ = plain_synthetic(256, 8, 3)
    assert not isinstance(plain, torch.utils.data.TensorDataset)
    assert len(plain) == len(fast)
    for i in (0, 17, 229):
        assert all(torch.equal(a, b) for a, b in zip(plain[i], fast[i], strict=True))


@pytest.mark.slow
def test_data_suite_runs_tiny_and_writes_json(tmp_path: Path) -> None:
    assert main(["data", "--tiny", "--repeats", "1", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "data.json").read_text())
    assert record["tiny"] is True and record["suite"] == "data"
    runs = {"1 rank, 0 workers", "1 rank, 2 workers", "TensorDataset", "plain dataset"}
    assert runs <= record["samples_per_s"].keys()
    assert all(s["median"] > 0 for s in record["samples_per_s"].values())
    assert {"workers_2_to_0_1rank", "fast_path_to_plain"} <= record["ratios"].keys()
    assert record["item_ms"] > 0
    shares = record["neighbours_cpu_share"]["per_measurement"]
    assert len(shares) in (0, 8) and all(0 <= s <= 1 for s in shares)  # one per measurement (none without /proc)
    assert (tmp_path / "data.png").stat().st_size > 1000
