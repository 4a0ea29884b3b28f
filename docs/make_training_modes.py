"""Batch vs online training, SGD vs Adam, on the digits task: real launcher runs -> docs/training_modes.*

    python docs/make_training_modes.py            # ~1-2 minutes on 2 CPU cores

Four runs of ``python -m launcher --gpus 2``: batch training (300 steps of 32 samples per rank) and
online training (the digits training split streamed twice, as JSON lines, one record per rank per
update), each with the ``sgd`` and ``adam`` optimizer configs. Writes ``training_modes.md`` (the
table), ``training_modes.png`` (loss against samples seen) and ``training_modes.json`` next to
this script. Test accuracy is measured on the same held-out digits split in every run.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs"
sys.path.insert(0, str(ROOT))

from workers.config import DataConfig  # noqa: E402
from workers.data import build_data  # noqa: E402

RANKS = 2
BATCH = ["mode=batch", "trainer.max_steps=300", "data.batch_size=32", "trainer.log_every=5"]
ONLINE = ["mode=online", "online.source=file", "online.batch_size=1", "online.idle_timeout_s=2",
          "online.poll_s=0.05", "online.window=500", "trainer.max_steps=0", "trainer.log_every=20"]


def digits_stream(path: Path, passes: int = 2) -> int:
    """The digits training split (never the test split), shuffled, ``passes`` times, as JSON lines."""
    train = build_data(DataConfig()).train
    x, y = train.tensors  # type: ignore[attr-defined]
    order, lines, rng = list(range(len(x))), [], random.Random(0)
    for _ in range(passes):
        rng.shuffle(order)
        lines += [json.dumps({"x": [round(v, 4) for v in x[i].tolist()], "y": int(y[i])}) + "\n" for i in order]
    path.write_text("".join(lines))
    return len(lines)


def run(run_dir: Path, *overrides: str) -> dict:
    subprocess.run([sys.executable, "-m", "launcher", "--gpus", str(RANKS), "--run-dir", str(run_dir), "--no-resume",
                    *overrides], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags}
    return {"result": json.loads((run_dir / "result.json").read_text()), "series": series}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, fig = {}, plt.figure(figsize=(8, 4.5))
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / "digits.jsonl"
        records = digits_stream(stream)
        for mode, extra, samples_per_step in (("batch", BATCH, 32 * RANKS), ("online", ONLINE, RANKS)):
            for opt in ("sgd", "adam"):
                name = f"{mode} + {opt}"
                args = [*extra, f"optimizer={opt}"] + ([f"online.path={stream}"] if mode == "online" else [])
                got = run(Path(tmp) / name.replace(" + ", "-"), *args)
                # online: the rolling prequential loss (each record scored before training on it);
                # a single record's loss is too noisy to plot
                loss = got["series"]["online/prequential_loss" if mode == "online" else "train/loss"]
                plt.plot([s * samples_per_step for s, _ in loss], [v for _, v in loss], label=name)
                res = got["result"]
                rows[name] = {"test_accuracy": res["test/accuracy"], "test_loss": res["test/loss"],
                              "steps": res["step"], "samples": res["step"] * samples_per_step,
                              "prequential_accuracy": res.get("online/prequential_accuracy_run")}
                print(f"{name:14s} test accuracy {res['test/accuracy']:.4f}", flush=True)
    plt.xlabel("training samples seen (all ranks)")
    plt.ylabel("train loss (online: rolling prequential loss)")
    plt.title(f"digits MLP, {RANKS} CPU ranks: batch vs online, SGD vs Adam")
    plt.legend()
    plt.tight_layout()
    fig.savefig(OUT / "training_modes.png", dpi=100)
    (OUT / "training_modes.json").write_text(json.dumps({"stream_records": records, "runs": rows}, indent=1))
    table = ["| run | optimizer config | updates | samples seen | test accuracy | prequential accuracy |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        preq = f"{r['prequential_accuracy']:.3f}" if r["prequential_accuracy"] is not None else "–"
        table.append(f"| {name.split(' + ')[0]} | {name.split(' + ')[1]} | {r['steps']} | {r['samples']} | "
                     f"{r['test_accuracy']:.3f} | {preq} |")
    (OUT / "training_modes.md").write_text(PAGE.format(table="\n".join(table), records=records))
    print(f"wrote {OUT / 'training_modes.md'} and training_modes.png")


PAGE = """# Batch vs online training, SGD vs Adam (digits)

Generated by `python docs/make_training_modes.py` from four real runs of `python -m launcher --gpus 2`
(2 CPU ranks on gloo): **batch** training — 300 steps of 32 samples per rank, epochs over the digits
training split — and **online** training — the same split streamed as {records} JSON lines (two
shuffled passes) through a file, one record per rank per update, each record trained once
(`mode=online online.source=file online.batch_size=1`). Optimizers are the `sgd` (lr 0.05,
momentum 0.9) and `adam` (lr 0.003) configs. Test accuracy is on the held-out digits test split.
Prequential accuracy is test-then-train: each record is scored before the model learns from it.

{table}

![loss curves](training_modes.png)

How to read it: online training sees each record once and updates after every record per rank
(a gradient averaged over {ranks} records), so it makes many small, noisy updates from few samples;
batch training averages 64 samples per update and revisits the data for several epochs. The online
curve is the rolling prequential loss over the last 500 records — the loss on records the model had
not trained on yet — so it is an honest estimate of how the model does on new data as it learns.
""".replace("{ranks}", str(RANKS))


if __name__ == "__main__":
    main()
