"""Run an exported model: ``python -m workers.export.predict EXPORT_DIR [--int8] < inputs.jsonl > out.jsonl``.

Each input line is a JSON array (the input of one sample: features, or token ids) or an object with the
array under "x". Each output line is ``{"outputs": [...]}`` with the model's output for that sample, plus
``"label"`` (the argmax) when the outputs are class scores (export.json says so; without it: a vector of
more than one score).

Needs only torch: the program is loaded from model.pt2, not rebuilt from the training code or config.
``--int8`` loads model_int8.pt2, which also needs torchao (its int8 weights are a torchao tensor type).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

CHUNK = 256  # input lines per forward pass


# -- nested inputs/outputs: a tensor, or lists/tuples/dicts of them ---------------------------------------
def tree_map(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(tree_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: tree_map(fn, v) for k, v in obj.items()}
    return obj


def tree_cat(parts: list[Any]) -> Any:
    """Concatenate along dim 0 a list of same-structured outputs."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, (list, tuple)):
        return type(first)(tree_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: tree_cat([p[k] for p in parts]) for k in first}
    return first


def fixed_batch(fn: Callable[[Any], Any], batch: int) -> Callable[[Any], Any]:
    """``fn`` for any number of rows when it only takes exactly ``batch`` (a program exported with static
    shapes): rows go in chunks of ``batch``, the last padded by repeating its last row, padding dropped."""

    def run(x: Any) -> Any:
        n = len(next(iter(leaves(x))))
        parts = []
        for i in range(0, n, batch):
            k = min(batch, n - i)
            chunk = tree_map(lambda t, i=i, k=k: torch.cat([t[i:i + k], t[i + k - 1:i + k].expand(batch - k,
                                                                                                     *t.shape[1:])]),
                             x)
            parts.append(tree_map(lambda t, k=k: t[:k], fn(chunk)))
        return tree_cat(parts)

    return run


def leaves(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from leaves(o)


# -- loading -------------------------------------------------------------------------------------------
class Predictor:
    """An exported program (fp32 or int8) with what predict needs to feed it: the input's dtype and shape."""

    def __init__(self, export_dir: Path, int8: bool = False) -> None:
        self.info: dict[str, Any] = {}
        if (export_dir / "export.json").exists():
            self.info = json.loads((export_dir / "export.json").read_text())
        name = "model_int8.pt2" if int8 else "model.pt2"
        path = export_dir / name
        if int8:
            if not path.exists():
                why = (self.info.get("int8") or {}).get("skipped") or (self.info.get("int8") or {}).get("note")
                raise SystemExit(f"predict: no {path}" + (f": {why}" if why else " (export with --quantize)"))
            from workers.export.quantize import import_torchao

            import_torchao()  # the program's int8 weights are torchao tensors
        elif not path.exists():
            raise SystemExit(f"predict: no {path} (python -m workers.export RUN_DIR --out {export_dir})")
        program = torch.export.load(str(path))
        spec = (self.info.get("int8_program") if int8 else self.info.get("program")) or {}
        self.module = program.module()
        self.fn: Callable[[Any], Any] = self.module
        if spec.get("dynamic_batch") is False:
            self.fn = fixed_batch(self.module, int(spec["batch"]))
        inputs = [n.meta.get("val") for n in program.graph.nodes
                  if n.op == "placeholder" and n.name in set(program.graph_signature.user_inputs)]
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            raise SystemExit(f"predict: {path} takes {len(inputs)} inputs; this command feeds one tensor")
        self.dtype = inputs[0].dtype
        # the sample's shape: ints where the program fixed them, None where a dimension is symbolic
        self.shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape[1:])
        self.classes = self.info.get("outputs") == "class_scores" if "outputs" in self.info else None

    def tensor(self, rows: list[Any], first_line: int) -> torch.Tensor:
        for i, row in enumerate(rows):
            shape = _shape(row)
            if len(shape) != len(self.shape) or any(e is not None and e != s for e, s in zip(self.shape, shape,
                                                                                            strict=True)):
                want = "[" + ", ".join("N" if e is None else str(e) for e in self.shape) + "]"
                raise SystemExit(f"predict: input line {first_line + i} has shape {list(shape)}; the model takes "
                                 f"{want}")
        return torch.tensor(rows, dtype=self.dtype)

    def __call__(self, x: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.fn(x)

    def rows(self, outputs: Any, n: int) -> Iterator[dict[str, Any]]:
        for i in range(n):
            out = tree_map(lambda t, i=i: t[i], outputs)
            row: dict[str, Any] = {"outputs": _jsonable(out)}
            scores = isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 1
            if scores and (self.classes or (self.classes is None and out.dim() == 1 and out.numel() > 1)):
                row["label"] = out.argmax(-1).tolist()
            yield row


def _shape(row: Any) -> tuple[int, ...]:
    shape = []
    while isinstance(row, list):
        shape.append(len(row))
        row = row[0] if row else None
    return tuple(shape)


def _jsonable(out: Any) -> Any:
    """Tensors to lists, floats rounded to 6 digits."""
    if isinstance(out, torch.Tensor):
        return _jsonable(out.tolist())
    if isinstance(out, (list, tuple)):
        return [_jsonable(o) for o in out]
    if isinstance(out, dict):
        return {k: _jsonable(v) for k, v in out.items()}
    return round(out, 6) if isinstance(out, float) else out


def load(export_dir: Path, int8: bool = False) -> Predictor:
    return Predictor(Path(export_dir), int8)


def predict_lines(predictor: Predictor, lines: Iterable[str]) -> Iterator[str]:
    """JSON input lines -> JSON output lines, CHUNK inputs per forward pass."""
    numbered = ((n, line) for n, line in enumerate(lines, 1) if line.strip())
    while chunk := list(itertools.islice(numbered, CHUNK)):
        rows = []
        for n, line in chunk:
            try:
                row = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"predict: input line {n} is not JSON: {e}") from None
            rows.append(row["x"] if isinstance(row, dict) else row)
        outputs = predictor(predictor.tensor(rows, chunk[0][0]))
        for row in predictor.rows(outputs, len(rows)):
            yield json.dumps(row)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.export.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", type=Path)
    p.add_argument("--int8", action="store_true", help="use the int8 program (model_int8.pt2; needs torchao)")
    args = p.parse_args(argv)
    predictor = load(args.export_dir, args.int8)
    for line in predict_lines(predictor, sys.stdin):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
