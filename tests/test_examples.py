"""examples/: each example's documented command, run for real (2 gloo ranks) at tiny sizes, learns its task.

The slow tests take the ``python -m launcher …`` line from the docstring of each example's ``__init__.py``
(the line examples/README.md shows too), run it with a few overrides appended (later overrides win), and
check what the run learned. The fast tests check the pieces in-process.
"""

from __future__ import annotations

import importlib
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, newest_weights, run_launcher, scalars

EXAMPLES = ("image_folder", "gpt", "linear_regression")


@pytest.fixture(autouse=True)
def _examples_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT))  # `examples` is imported from the repository root, as the ranks do


def documented(example: str) -> str:
    """The one ``python -m launcher`` line of an example's docstring (with its preparation step, if any)."""
    doc = (ROOT / "examples" / example / "__init__.py").read_text()
    lines = [ln.strip() for ln in doc.splitlines() if "python -m launcher" in ln]
    assert len(lines) == 1, f"examples/{example}/__init__.py: expected one command line, found {lines}"
    return lines[0]


def run_documented(example: str, run_dir: Path, *, replace: dict[str, str] | None = None,
                   prepare_extra: tuple[str, ...] = (), overrides: tuple[str, ...] = ()) -> tuple[str, float]:
    """Run the documented line from the repository root: its preparation command (plus ``prepare_extra``),
    then the launcher with ``--run-dir`` and ``overrides`` appended. Returns (stdout, launcher seconds)."""
    line = documented(example)
    for old, new in (replace or {}).items():
        line = line.replace(old, new)
    *prepare, launch = line.split(" && ")
    for step in prepare:
        argv = shlex.split(step)
        assert argv[0] == "python"
        subprocess.run([sys.executable, *argv[1:], *prepare_extra], cwd=ROOT, check=True, capture_output=True)
    argv = shlex.split(launch)
    assert argv[:3] == ["python", "-m", "launcher"]
    start = time.monotonic()
    proc = run_launcher(["--run-dir", str(run_dir), *argv[3:], *overrides], cwd=ROOT, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, seconds


QUIET = ("trainer.eval_every=100000", "trainer.checkpoint_every=100000")  # evaluate and save at the end only


# -- fast: the docs and the pieces -------------------------------------------------------------------------
def test_readme_shows_each_documented_command() -> None:
    readme = (ROOT / "examples" / "README.md").read_text()
    for example in EXAMPLES:
        assert documented(example) in readme, example


def test_image_folder_config_dir_builds_on_the_builtin_defaults() -> None:
    """The example's conf/ includes the built-in `base` and overrides only what differs; built-in groups
    are still there to choose."""
    from launcher.config.compose import compose_config

    builtin = compose_config([])
    own = compose_config(["data.root=/nowhere"], ROOT / "examples" / "image_folder" / "conf")
    assert own.model["_target_"] == "examples.image_folder.model.ResNet"
    assert own.data["_target_"] == "examples.image_folder.data.make_data" and own.data["num_workers"] == 2
    assert own.optimizer["_target_"] == "torch.optim.AdamW" and own.optimizer["lr"] == 0.003
    assert own.schedule.name == "cosine" and own.trainer.max_steps == 300
    for key in ("loss", "metrics", "ddp", "online", "seed", "mode"):
        assert getattr(own, key) == getattr(builtin, key), key
    sgd = compose_config(["data.root=/nowhere", "optimizer=sgd"], ROOT / "examples" / "image_folder" / "conf")
    assert sgd.optimizer["_target_"] == "torch.optim.SGD"


def test_image_folder_data_reads_the_generated_folder(tmp_path: Path) -> None:
    make_images = importlib.import_module("examples.image_folder.make_images")
    data = importlib.import_module("examples.image_folder.data")
    make_images.write(tmp_path, per_class=5, size=12)
    train, held_out = data.make_data(str(tmp_path), image_size=8, eval_fraction=0.2, split_seed=0)
    assert (len(train), len(held_out)) == (12, 3)
    x, label = held_out[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
    labels = sorted(label for _, label in (train[i] for i in range(len(train))))
    assert set(labels) == {0, 1, 2}
    model = importlib.import_module("examples.image_folder.model").ResNet(classes=3, width=4, blocks=2)
    assert model(torch.stack([x, x])).shape == (2, 3)


def test_gpt_windows_are_shifted_by_one(tmp_path: Path) -> None:
    make_tokens = importlib.import_module("examples.gpt.make_tokens")
    data = importlib.import_module("examples.gpt.data")
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(range(200)))
    make_tokens.main([str(text), str(tmp_path / "t.bin")])
    train, held_out = data.token_windows(str(tmp_path / "t.bin"), context=8, eval_fraction=0.2)
    x, y = train[1]
    assert x.tolist() == list(range(8, 16)) and y.tolist() == list(range(9, 17))
    assert int(held_out[0][0][0]) >= 160  # the eval windows are the file's tail
    gpt = importlib.import_module("examples.gpt.model").GPT(context=8, layers=1, heads=2, width=16)
    assert gpt(x[None]).shape == (1, 8, 256)


# -- slow: the documented commands, run ------------------------------------------------------------------
@pytest.mark.slow
def test_image_folder_example_learns_the_patterns(tmp_path: Path) -> None:
    out, seconds = run_documented(
        "image_folder", tmp_path / "run", replace={"/tmp/shapes": str(tmp_path / "shapes")},
        prepare_extra=("--per-class", "40", "--size", "16"),
        overrides=("data.image_size=16", "data.batch_size=16", "model.width=8", "trainer.max_steps=60",
                   "schedule.warmup_steps=5", *QUIET))
    assert "data.num_workers=2" in documented("image_folder")  # PIL decodes in the DataLoader workers
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["step"] == 60
    assert result["test/accuracy"] > 0.7, result  # 3 classes: chance is 1/3
    print(f"image_folder: {seconds:.1f} s, {result}")


@pytest.mark.slow
def test_gpt_example_loss_decreases(tmp_path: Path) -> None:
    tokens = tmp_path / "readme.bin"
    out, seconds = run_documented(
        "gpt", tmp_path / "run", replace={"/tmp/readme.bin": str(tokens)},
        overrides=("data.context=32", "model.width=32", "model.heads=2", "data.batch_size=8",
                   "optimizer.lr=0.01", "trainer.max_steps=40", "trainer.log_every=1", "schedule.warmup_steps=5",
                   *QUIET))
    assert tokens.stat().st_size == 2 * (ROOT / "README.md").stat().st_size  # a uint16 per byte
    assert "context: 32" in (tmp_path / "run" / "config.yaml").read_text().split("data:")[0]  # ${data.context}
    losses = [v for _, v in scalars(tmp_path / "run", "train/loss")]
    assert losses[0] > 5.0  # step 1: about ln 256 = 5.5 (uniform over the bytes)
    assert losses[-1] < losses[0] - 1.5, losses
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["test/loss"] < math.log(256) - 1.5, result
    print(f"gpt: {seconds:.1f} s, losses {[round(v, 2) for v in losses[::5]]} (every 5th), {result}")


@pytest.mark.slow
def test_linear_regression_example_recovers_slope_and_intercept(tmp_path: Path) -> None:
    out, seconds = run_documented("linear_regression", tmp_path / "run")
    weights = newest_weights(tmp_path / "run")  # rank 0's checkpoint: RUN_DIR/checkpoints/step-*.pt
    w, b = weights["weight"].item(), weights["bias"].item()
    assert abs(w - 2) < 0.1 and abs(b) < 0.1, (w, b)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert "test/mae" in result and "test/accuracy" not in result
    assert result["test/mae"] < 0.12  # noise 0.1: E|noise| = 0.08
    print(f"linear_regression: {seconds:.1f} s, w={w:.4f} b={b:.4f}, {result}")
