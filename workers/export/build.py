"""Export a trained run for deployment: ``python -m workers.export RUN_DIR --out DIR [--step N] [--quantize]``.

Works for any task the trainer runs: the model and data are rebuilt from the checkpoint's own config
(``workers/task.py``), and the example input that ``torch.export`` traces with is a few samples of the
eval split (the train split when there is none). From rank 0's checkpoint (the newest intact one, or
``--step``) it writes:

    model.safetensors   the weights (a tensor shared by several names, such as a tied head, stored once;
                        the dropped names are in the file's metadata and export.json's "tied")
    config.yaml         the resolved training config
    model.pt2           a torch.export'ed inference program, dynamic in the batch dimension (static shapes,
                        with a note in export.json, when the model does not export with a dynamic batch);
                        it loads with ``torch.export.load`` alone, without this repository
    model_int8.pt2      with --quantize: the same with every nn.Linear in int8 (torchao, see quantize.py);
                        loading it also needs torchao
    export.json         step, bytes per file, and the run's own loss and metrics (task.build_loss/metrics)
                        on the eval split — at most 2048 samples — for the checkpoint model, the exported
                        program and the int8 program; "weight_bytes" compares fp32 and int8 weights alone
                        (a .pt2 also holds its graph, tens of KB, more for int8's quantize ops: for a tiny
                        model that outweighs the weights)

``python -m workers.export.predict DIR [--int8] < inputs.jsonl`` runs the exported program.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from workers import contract

MAX_EVAL_SAMPLES = 2048  # eval samples scored per model in export.json: enough to compare, quick to run
EXAMPLE_ROWS = 4  # samples in the example batch that torch.export traces with


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


# -- data ----------------------------------------------------------------------------------------------
def _batches(dataset: Any, limit: int, batch_size: int) -> list[Any]:
    """The first ``limit`` samples of a map-style dataset as ``(inputs, targets)`` batches: sliced from
    a TensorDataset, else collated from single samples with default_collate."""
    from torch.utils.data import DataLoader, Subset, TensorDataset

    n = min(len(dataset), limit)
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        return [(x[i:min(i + batch_size, n)], y[i:min(i + batch_size, n)]) for i in range(0, n, batch_size)]
    return [tuple(b) for b in DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False)]


def _dynamic_shapes(example: Any, batch: Any) -> Any:
    """torch.export's dynamic_shapes for one positional input: dim 0 of every tensor is ``batch``."""
    if isinstance(example, torch.Tensor):
        return {0: batch}
    if isinstance(example, (list, tuple)):
        return type(example)(_dynamic_shapes(e, batch) for e in example)
    if isinstance(example, dict):
        return {k: _dynamic_shapes(v, batch) for k, v in example.items()}
    return None


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"


def export_program(model: torch.nn.Module, example: Any) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """torch.export with a dynamic batch dimension, else with static shapes; and how it was exported."""
    from workers.export.predict import leaves

    batch = len(next(leaves(example)))
    try:
        dim = torch.export.Dim("batch", min=1)
        program = torch.export.export(model, (example,), dynamic_shapes=(_dynamic_shapes(example, dim),))
        return program, {"dynamic_batch": True}
    except Exception as e:  # data-dependent code, a batch-size specialization, ...
        note = (f"exporting with a dynamic batch dimension failed ({_first_line(e)}); exported with static "
                f"shapes: the program takes exactly {batch} samples per call (predict pads and splits)")
    program = torch.export.export(model, (example,))
    return program, {"dynamic_batch": False, "batch": batch, "note": note}


def _callable(program: torch.export.ExportedProgram, how: dict[str, Any]) -> Callable[[Any], Any]:
    from workers.export.predict import fixed_batch

    module = program.module()
    return module if how["dynamic_batch"] else fixed_batch(module, how["batch"])


@torch.no_grad()
def evaluate(fn: Callable[[Any], Any], batches: list[Any], loss_fn: Callable, metric_fns: dict[str, Callable]
             ) -> dict[str, float]:
    """Sample-weighted means of the loss and each metric over the batches (a metric that returns None, such
    as accuracy on regression targets, is left out) — what workers/evaluate.py reports."""
    fns = {"loss": loss_fn, **metric_fns}
    sums, counts = dict.fromkeys(fns, 0.0), dict.fromkeys(fns, 0)
    for inputs, targets in batches:
        outputs = fn(inputs)
        n = len(targets)
        for name, f in fns.items():
            value = f(outputs, targets)
            if value is not None:
                sums[name] += float(value) * n
                counts[name] += n
    return {name: sums[name] / counts[name] for name in fns if counts[name]}


def _describe(example: Any) -> Any:
    """dtype and per-sample shape of the input (None for the batch dimension)."""
    if isinstance(example, torch.Tensor):
        return {"dtype": str(example.dtype).removeprefix("torch."), "shape": [None, *example.shape[1:]]}
    if isinstance(example, (list, tuple)):
        return [_describe(e) for e in example]
    if isinstance(example, dict):
        return {k: _describe(v) for k, v in example.items()}
    return type(example).__name__


# -- export --------------------------------------------------------------------------------------------
def _load(directory: Path, step: int | None) -> tuple[int, Any, torch.nn.Module]:
    """(step, config, model in eval mode) from checkpoint ``step`` in ``directory``, default the newest intact one."""
    from workers import checkpoint as ck
    from workers import task
    from workers.config import from_container

    if step is None:
        step = ck.latest_valid(directory, _warn)
        if step is None:
            raise SystemExit(f"export: no intact checkpoint in {directory}")
    elif (problem := ck.verify(directory, step)) is not None:
        raise SystemExit(f"export: checkpoint step {step} in {directory}: {problem}")
    state = torch.load(ck.ckpt_path(directory, step), map_location="cpu", weights_only=True)
    cfg = from_container(state[ck.CONFIG])
    model = task.build_model(cfg)
    model.load_state_dict(state[ck.MODEL])
    return step, cfg, model.eval()


def _split(cfg: Any) -> tuple[str, Any]:
    """The split that scores the models and gives the example input: eval, else train."""
    from workers import task

    train, evaluation = task.build_data(cfg)
    split, dataset = ("eval", evaluation) if evaluation is not None else ("train", train)
    if len(dataset) == 0:
        raise SystemExit(f"export: the {split} dataset is empty: no example input to export with")
    return split, dataset


def _write_weights(out: Path, model: torch.nn.Module, cfg: Any) -> dict[str, str]:
    """model.safetensors and config.yaml into ``out``; the tied names safetensors dropped (dropped -> kept)."""
    from safetensors.torch import save_model

    from workers.config import to_yaml

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model_int8.pt2", "model_int8.pt"):  # an earlier export's int8 variant is not this one's
        (out / stale).unlink(missing_ok=True)
    tied: dict[str, str] = {}  # safetensors stores shared storage once: dropped name -> kept name
    save_model(model, str(out / "model.safetensors"), metadata=tied)
    (out / "config.yaml").write_text(to_yaml(cfg))
    # safetensors creates its file 0600; give it the mode of the others (what the umask allows)
    os.chmod(out / "model.safetensors", (out / "config.yaml").stat().st_mode & 0o777)
    return tied


def _outputs(model: torch.nn.Module, batch: Any) -> str:
    """class_scores when the model scores classes (integer targets, one more output dimension), else values."""
    with torch.no_grad():
        outputs, targets = model(batch[0]), batch[1]
    classes = (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)
               and not targets.is_floating_point() and outputs.dim() == targets.dim() + 1)
    return "class_scores" if classes else "values"


def _int8(model: torch.nn.Module, example: Any, out: Path, scheme: str, report: dict[str, Any],
          score: Callable[[Callable[[Any], Any]], dict[str, float]]) -> list[str]:
    """The int8 variant into ``out`` and ``report``: a torch.export'ed program, else the quantized state dict;
    the files written."""
    from workers.export import quantize as q

    report["int8"] = {"scheme": scheme, "library": "torchao"}
    linears = q.linear_layers(model)
    if not linears:
        report["int8"]["skipped"] = (f"{type(model).__name__} has no torch.nn.Linear layer: nothing to "
                                     "quantize, no int8 variant written")
        return []
    qmodel = q.quantize_int8(model, scheme)
    report["int8"].update(version=q.import_torchao().__version__, linear_layers=len(linears))
    report["weight_bytes"]["int8"] = q.weight_bytes(qmodel)
    try:
        qprogram, qhow = export_program(qmodel, example)
        torch.export.save(qprogram, str(out / "model_int8.pt2"))
        report["int8_program"] = qhow
        report["metrics"]["int8"] = score(_callable(qprogram, qhow))
        return ["model_int8.pt2"]
    except Exception as e:  # keep the quantized weights: loadable into the model with torchao installed
        torch.save(qmodel.state_dict(), out / "model_int8.pt")
        report["int8"]["note"] = (f"torch.export of the int8 model failed ({_first_line(e)}); wrote its "
                                  "state dict to model_int8.pt instead (torch.load(..., weights_only="
                                  "False) with torchao installed, then load_state_dict(..., assign=True) "
                                  "into the model built from config.yaml)")
        report["metrics"]["int8"] = score(qmodel)
        return ["model_int8.pt"]


def export(run_dir: Path, out: Path, step: int | None = None, quantize: bool = False, scheme: str = "dynamic",
           max_eval_samples: int = MAX_EVAL_SAMPLES) -> dict[str, Any]:
    """Export checkpoint ``step`` (default: the newest intact one) of ``run_dir`` into ``out``; returns the
    report also written to ``out/export.json``."""
    from workers import task
    from workers.export import quantize as q
    from workers.export.predict import tree_map

    run_dir, out = Path(run_dir), Path(out)
    step, cfg, model = _load(contract.checkpoint_dir(run_dir), step)
    split, dataset = _split(cfg)
    batches = _batches(dataset, max_eval_samples, max(256, int(cfg.data["batch_size"])))
    # cloned: a slice of a TensorDataset shares its storage, which the program would save whole
    example = tree_map(torch.clone, _batches(dataset, EXAMPLE_ROWS, EXAMPLE_ROWS)[0][0])
    score = functools.partial(evaluate, batches=batches, loss_fn=task.build_loss(cfg),
                              metric_fns=task.build_metrics(cfg))

    tied = _write_weights(out, model, cfg)
    files = ["model.safetensors", "config.yaml", "model.pt2"]
    try:
        program, how = export_program(model, example)
    except Exception as e:
        raise SystemExit(f"export: torch.export could not capture {type(model).__name__} with the {split} "
                         f"split's inputs ({_first_line(e)})") from e
    torch.export.save(program, str(out / "model.pt2"))

    report: dict[str, Any] = {
        "step": step, "run_dir": str(run_dir), "input": _describe(example), "outputs": _outputs(model, batches[0]),
        "program": how, "tied": tied,
        "eval": {"split": split, "samples": sum(len(b[1]) for b in batches), "of": len(dataset)},
        "metrics": {"checkpoint": score(model), "exported": score(_callable(program, how))},
        "weight_bytes": {"fp32": q.weight_bytes(model)},
    }
    if quantize:
        files += _int8(model, example, out, scheme, report, score)
    report["bytes"] = {f: (out / f).stat().st_size for f in files}
    (out / "export.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    from workers.export.quantize import SCHEMES

    p = argparse.ArgumentParser(prog="python -m workers.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step", type=int, default=None, help="default: the newest intact checkpoint")
    p.add_argument("--quantize", action="store_true", help="also write an int8 variant (needs torchao)")
    p.add_argument("--scheme", choices=SCHEMES, default="dynamic",
                   help="int8 scheme: dynamic = int8 weights and activations (default); weight-only = int8 weights")
    p.add_argument("--max-eval-samples", type=int, default=MAX_EVAL_SAMPLES,
                   help=f"eval samples scored per model in export.json (default {MAX_EVAL_SAMPLES})")
    args = p.parse_args(argv)
    from workers.export.quantize import QuantizeError

    try:
        report = export(args.run_dir, args.out, args.step, args.quantize, args.scheme, args.max_eval_samples)
    except QuantizeError as e:
        raise SystemExit(f"export: {e}") from None
    print(json.dumps(report, indent=1))
    return 0
