"""Export round trips: safetensors + torch.export program + int8 (torchao) variant, predictions through
``python -m workers.export.predict``, for any task: the digits MLP and a user's regression trained through
the launcher; a tied-weight GPT, a model without Linear layers and one that only exports with static shapes
from checkpoints written here.

The command-line runs use ``-W error::DeprecationWarning``: the deprecated ``torch.ao.quantization`` and
``torch.jit`` paths (or anything else deprecated) would fail them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, finish, launch, start
from safetensors.torch import load_file, load_model

from launcher.config.compose import compose_config
from workers import checkpoint as ck
from workers.config import to_dict
from workers.export import export
from workers.export.predict import load, predict_lines

DEPRECATED = ("DeprecationWarning", "torch.ao.quantization", "torch.jit", "TorchScript")


def _python(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -W error::DeprecationWarning ARGS`` from the repository root; insists on exit 0 and a stderr
    free of deprecations."""
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", *args], input=stdin, cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert not any(word in proc.stderr for word in DEPRECATED), proc.stderr
    return proc


def _predict(out: Path, rows: list[Any], *flags: str) -> list[dict[str, Any]]:
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    proc = _python("-m", "workers.export.predict", str(out), *flags, stdin=lines)
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _write_checkpoint(run_dir: Path, overrides: list[str], model: torch.nn.Module | None = None,
                      step: int = 7) -> torch.nn.Module:
    """A rank-0 checkpoint (file + manifest) of ``model`` (default: freshly built from the config)."""
    from workers import task

    cfg = compose_config(overrides)
    model = model if model is not None else task.build_model(cfg)
    manager = ck.CheckpointManager(run_dir / "checkpoints", None, every=1, keep=1, meta={})
    manager._write(step, {ck.MODEL: model.state_dict(), ck.CONFIG: to_dict(cfg)})
    return model


# -- trained through the launcher ---------------------------------------------------------------------
@pytest.mark.slow
def test_digits_mlp_export_quantize_and_predict(tmp_path: Path) -> None:
    from workers.data.builtin import load_digits_tensors
    from workers.models.mlp import MLP

    run, out = tmp_path / "run", tmp_path / "out"
    launch(run, "trainer.max_steps=60", "trainer.eval_every=1000")
    _python("-m", "workers.export", str(run), "--out", str(out), "--quantize")
    report = json.loads((out / "export.json").read_text())
    m = report["metrics"]
    assert report["step"] == 60 and report["program"]["dynamic_batch"] and report["outputs"] == "class_scores"
    assert report["eval"] == {"split": "eval", "samples": 359, "of": 359}
    assert m["exported"] == pytest.approx(m["checkpoint"]) and m["checkpoint"]["accuracy"] >= 0.85
    assert abs(m["int8"]["accuracy"] - m["checkpoint"]["accuracy"]) <= 0.03  # within 3 points
    assert abs(m["int8"]["loss"] - m["checkpoint"]["loss"]) <= 0.05
    assert report["int8"]["linear_layers"] == 2 and report["int8"]["library"] == "torchao"
    assert set(report["bytes"]) == {"model.safetensors", "config.yaml", "model.pt2", "model_int8.pt2"}
    assert all(report["bytes"][f] == (out / f).stat().st_size > 0 for f in report["bytes"])
    assert report["weight_bytes"]["int8"] < report["weight_bytes"]["fp32"] / 3  # int8 + scales vs fp32
    result = json.loads((run / "result.json").read_text())
    assert m["checkpoint"]["accuracy"] == pytest.approx(result["test/accuracy"])  # the trainer's own numbers

    ckpt = torch.load(ck.ckpt_path(run / "checkpoints", 60), weights_only=True)["model"]
    weights = load_file(str(out / "model.safetensors"))
    assert weights.keys() == ckpt.keys() and all(torch.equal(weights[k], ckpt[k]) for k in ckpt)
    model = MLP(64, 128, 10).eval()
    model.load_state_dict(ckpt)
    x, _ = load_digits_tensors()
    with torch.no_grad():
        expected = model(x[:50])
    rows: list[Any] = x[:50].tolist()
    rows[7] = {"x": rows[7]}  # the object form of a line
    fp32 = _predict(out, rows)
    assert [r["label"] for r in fp32] == expected.argmax(1).tolist()  # the checkpoint model's argmax
    assert torch.allclose(torch.tensor([r["outputs"] for r in fp32]), expected, atol=1e-4)
    int8 = _predict(out, rows, "--int8")
    agree = sum(a["label"] == b for a, b in zip(int8, expected.argmax(1).tolist(), strict=True))
    assert len(int8) == 50 and agree >= 47
    assert torch.allclose(torch.tensor([r["outputs"] for r in int8]), expected, atol=0.2)


REGRESSION = textwrap.dedent('''
    import torch
    from torch.utils.data import TensorDataset


    def make_data(n: int = 1024, features: int = 8):
        """y = x @ w + 0.5 + noise: float targets of shape (n, 1)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, features, generator=g)
        y = x @ torch.linspace(-1, 1, features).unsqueeze(1) + 0.5 + 0.01 * torch.randn(n, 1, generator=g)
        return TensorDataset(x[:768], y[:768]), TensorDataset(x[768:], y[768:])


    def mae(outputs, targets):
        return (outputs - targets).abs().mean()
''')


@pytest.mark.slow
def test_regression_export_of_a_users_task(tmp_path: Path) -> None:
    """A user's regression data and metric (in a directory of theirs) with torch.nn.Linear and MSELoss."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "exp_regress.py").write_text(REGRESSION)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(user), os.environ.get("PYTHONPATH")]))}
    run, out = tmp_path / "run", tmp_path / "out"
    code, stdout, stderr = finish(start(run, "trainer.max_steps=60", "trainer.eval_every=1000",
                                        "model._target_=torch.nn.Linear", "model.in_features=8", "model.out_features=1",
                                        "data._target_=exp_regress.make_data", "loss._target_=torch.nn.MSELoss",
                                        "metrics.mae._target_=exp_regress.mae", "optimizer.lr=0.05", "schedule=cosine",
                                        env=env))
    assert code == 0, f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    _python("-m", "workers.export", str(run), "--out", str(out), "--quantize", "--scheme", "weight-only", env=env)
    report = json.loads((out / "export.json").read_text())
    m = report["metrics"]
    assert report["outputs"] == "values" and report["input"] == {"dtype": "float32", "shape": [None, 8]}
    assert set(m["checkpoint"]) == {"loss", "mae"}  # accuracy does not apply to float targets: left out
    assert m["checkpoint"]["mae"] < 0.25 and m["exported"] == pytest.approx(m["checkpoint"])
    assert report["int8"]["scheme"] == "weight-only" and abs(m["int8"]["mae"] - m["checkpoint"]["mae"]) < 0.02

    ckpt = torch.load(ck.ckpt_path(run / "checkpoints", 60), weights_only=True)["model"]
    x = torch.randn(5, 8)
    expected = (x @ ckpt["weight"].T + ckpt["bias"]).squeeze(1).tolist()
    for flags, tol in (((), 1e-4), (("--int8",), 0.05)):
        rows = _predict(out, x.tolist(), *flags)
        assert all("label" not in r for r in rows)  # a single value, no class scores
        assert [r["outputs"][0] for r in rows] == pytest.approx(expected, abs=tol)


# -- checkpoints written here (no training) -------------------------------------------------------------
def test_tied_gpt_on_a_generic_dataset(tmp_path: Path) -> None:
    """GPT's head shares the token embedding; TokenWindows is a plain map-style dataset (default_collate)."""
    from workers.models.gpt import GPT

    run, out = tmp_path / "run", tmp_path / "out"
    model = _write_checkpoint(run, ["model=gpt", "data=synthetic_tokens", "data.num_samples=80", "data.context=16",
                                    "data.vocab_size=64", "model.layers=1", "model.heads=2", "model.width=32"])
    report = export(run, out, quantize=True)
    assert report["tied"] == {"tok.weight": "head.weight"}
    assert report["input"] == {"dtype": "int64", "shape": [None, 16]}
    assert report["eval"] == {"split": "eval", "samples": 4, "of": 4} and report["outputs"] == "class_scores"
    m = report["metrics"]
    assert m["exported"] == pytest.approx(m["checkpoint"]) and m["int8"]["loss"] == pytest.approx(
        m["checkpoint"]["loss"], rel=0.02)
    assert report["int8"]["linear_layers"] == 5 and (out / "model_int8.pt2").exists()
    reloaded = GPT(64, 16, 1, 2, 32)
    load_model(reloaded, str(out / "model.safetensors"))  # restores the tie from the one stored tensor
    assert reloaded.head.weight is reloaded.tok.weight
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.state_dict().items())

    tokens = torch.randint(0, 64, (3, 16))
    lines = [json.dumps(r) for r in tokens.tolist()]
    rows = list(map(json.loads, predict_lines(load(out), lines)))
    with torch.no_grad():
        expected = model.eval()(tokens)
    assert [r["label"] for r in rows] == expected.argmax(-1).tolist()  # a label per position
    int8 = list(map(json.loads, predict_lines(load(out, int8=True), lines)))
    assert torch.allclose(torch.tensor([r["outputs"] for r in int8]), expected, atol=0.05)


USER = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset


    class Scale(nn.Module):
        """No Linear layer: nothing for int8 to quantize."""

        def __init__(self, features: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 2.0, features))

        def forward(self, x):
            return x * self.weight


    class Fours(nn.Module):
        """Regroups its batch in fours: exports only with static shapes."""

        def __init__(self, features: int) -> None:
            super().__init__()
            self.lin = nn.Linear(features, features)

        def forward(self, x):
            return self.lin(x.reshape(4, -1).reshape(x.shape[0], -1))


    def data(features: int = 5):
        x = torch.randn(40, features, generator=torch.Generator().manual_seed(0))
        return TensorDataset(x, x.sum(1, keepdim=True).expand(-1, features)), None
''')


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "exp_user_parts.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return "exp_user_parts"


def test_a_model_without_linear_layers_is_exported_and_says_so(tmp_path: Path, user_module: str) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    _write_checkpoint(run, [f"model._target_={user_module}.Scale", "model.features=5",
                            f"data._target_={user_module}.data", "loss._target_=torch.nn.MSELoss"])
    report = export(run, out, quantize=True)
    assert "no torch.nn.Linear" in report["int8"]["skipped"] and "int8" not in report["metrics"]
    assert report["eval"]["split"] == "train"  # the data has no eval split
    assert not (out / "model_int8.pt2").exists() and set(report["bytes"]) == {"model.safetensors", "config.yaml",
                                                                              "model.pt2"}
    with pytest.raises(SystemExit, match="no torch.nn.Linear"):
        load(out, int8=True)
    x = torch.randn(2, 5)
    rows = [json.loads(r) for r in predict_lines(load(out), [json.dumps(r) for r in x.tolist()])]
    assert torch.allclose(torch.tensor([r["outputs"] for r in rows]), x * torch.linspace(0.5, 2.0, 5), atol=1e-5)
    assert all("label" not in r for r in rows)  # float targets: outputs are values, not class scores


def test_static_shapes_fallback(tmp_path: Path, user_module: str) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    model = _write_checkpoint(run, [f"model._target_={user_module}.Fours", "model.features=5",
                                    f"data._target_={user_module}.data", "loss._target_=torch.nn.MSELoss"])
    report = export(run, out, quantize=True, max_eval_samples=16)
    for key in ("program", "int8_program"):
        assert report[key]["dynamic_batch"] is False and report[key]["batch"] == 4
        assert "static shapes" in report[key]["note"]
    m = report["metrics"]
    assert report["eval"]["samples"] == 16 and m["exported"] == pytest.approx(m["checkpoint"])
    x = torch.randn(6, 5)  # not a multiple of 4: predict pads the last call and drops the padding
    rows = [json.loads(r) for r in predict_lines(load(out), [json.dumps(r) for r in x.tolist()])]
    with torch.no_grad():
        expected = torch.cat([model(x[:4]), model(torch.cat([x[4:], x[5:].expand(2, -1)]))[:2]])
    assert torch.allclose(torch.tensor([r["outputs"] for r in rows]), expected, atol=1e-5)


def test_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no intact checkpoint"):
        export(tmp_path / "nothing", tmp_path / "out")
    run = tmp_path / "run"
    _write_checkpoint(run, [], step=3)
    with pytest.raises(SystemExit, match="checkpoint step 4 .*no manifest"):
        export(run, tmp_path / "out", step=4)
    export(run, tmp_path / "out")
    with pytest.raises(SystemExit, match="input line 2 has shape \\[2\\]; the model takes \\[64\\]"):
        list(predict_lines(load(tmp_path / "out"), ["", "[1, 2]"]))
