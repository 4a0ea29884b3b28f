"""Run an exported model: ``python -m workers.predict EXPORT_DIR [--int8] < inputs.jsonl > predictions.jsonl``.

Each input line is a JSON list of features (or an object with "x"); each output line is
{"label": int, "scores": [...]}. Needs only torch: the program is loaded from model.pt2 (or the
TorchScript int8 variant), not rebuilt from training code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def load(export_dir: Path, int8: bool = False):  # noqa: ANN201
    if int8:
        return torch.jit.load(str(export_dir / "model_int8.pt"))
    return torch.export.load(str(export_dir / "model.pt2")).module()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", type=Path)
    p.add_argument("--int8", action="store_true", help="use the quantized variant")
    args = p.parse_args(argv)
    model = load(args.export_dir, args.int8)
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    if not rows:
        return 0
    x = torch.tensor([r["x"] if isinstance(r, dict) else r for r in rows], dtype=torch.float32)
    with torch.no_grad():
        scores = model(x)
    for row in scores:
        print(json.dumps({"label": int(row.argmax()), "scores": [round(float(v), 6) for v in row]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
