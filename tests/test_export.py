"""Export round trip: safetensors + torch.export program + int8 variant, predictions through workers.predict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, launch
from safetensors.torch import load_file

from workers.export import export

pytestmark = pytest.mark.slow


def test_export_round_trip(tmp_path: Path) -> None:
    launch(tmp_path / "run", "trainer.max_steps=300", "trainer.eval_every=1000")
    report = export(tmp_path / "run", tmp_path / "out", quantize=True)
    out = tmp_path / "out"
    acc = report["accuracy"]
    assert acc["exported"] == acc["checkpoint"] >= 0.9
    assert abs(acc["int8"] - acc["checkpoint"]) <= 0.02  # within 2 points
    assert report["bytes"]["model_int8.pt"] > 0 and report["step"] == 300
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "step-00000300.pt", weights_only=True)["model"]
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == ckpt.keys() and all(torch.equal(weights[k], ckpt[k]) for k in ckpt)

    from workers.data.builtin import load_digits_tensors

    x, _ = load_digits_tensors()
    lines = "".join(json.dumps(row) + "\n" for row in x[:50].tolist())
    program = torch.export.load(str(out / "model.pt2")).module()
    for flag in ([], ["--int8"]):
        proc = subprocess.run([sys.executable, "-m", "workers.predict", str(out), *flag], input=lines, cwd=ROOT,
                              capture_output=True, text=True, check=True)
        labels = [json.loads(line)["label"] for line in proc.stdout.splitlines()]
        assert len(labels) == 50
        if not flag:  # the exported program, unchanged, gives the checkpoint model's predictions
            assert labels == program(x[:50]).argmax(1).tolist()
