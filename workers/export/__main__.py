"""Export a trained run for deployment: ``python -m workers.export RUN_DIR [--step N] --out DIR [--quantize]``.

Writes, from rank 0's checkpoint (the newest intact one, or ``--step``):

    model.safetensors   the weights
    config.yaml         the resolved training config
    model.pt2           a torch.export'ed inference program (loads without this repository)
    model_int8.pt       with --quantize: a dynamically int8-quantized variant (TorchScript)
    export.json         file sizes, and test-split accuracy of each against the checkpoint model

``python -m workers.predict DIR < inputs.jsonl`` runs the exported program.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from workers import checkpoint as ck
from workers.config import from_container, to_yaml
from workers.data import build_data
from workers.model import build_model


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def export(run_dir: Path, out: Path, step: int | None = None, quantize: bool = False) -> dict[str, object]:
    directory = run_dir / "checkpoints"
    step = step if step is not None else ck.latest_valid(directory, lambda m: print(f"WARNING: {m}", file=sys.stderr))
    if step is None:
        raise SystemExit(f"export: no intact checkpoint in {directory}")
    if (problem := ck.verify(directory, step)) is not None:
        raise SystemExit(f"export: checkpoint step {step} in {directory}: {problem}")
    state = torch.load(ck.ckpt_path(directory, step), map_location="cpu", weights_only=True)
    cfg = from_container(state[ck.CONFIG])
    data = build_data(cfg.data)
    model = build_model(cfg.model, data)
    model.load_state_dict(state[ck.MODEL])
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    # tied weights (GPT's head) share storage; safetensors wants each tensor once
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"},
              str(out / "model.safetensors"))
    (out / "config.yaml").write_text(to_yaml(cfg))
    x, y = (torch.stack(t) for t in zip(*[data.test[i] for i in range(len(data.test))], strict=True))
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(out / "model.pt2"))
    report: dict[str, object] = {"step": step, "test_samples": len(y),
                                 "accuracy": {"checkpoint": _accuracy(model, x, y),
                                              "exported": _accuracy(program.module(), x, y)}}
    files = ["model.safetensors", "config.yaml", "model.pt2"]
    if quantize:
        qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        torch.jit.save(torch.jit.trace(qmodel, x[:2]), str(out / "model_int8.pt"))
        report["accuracy"]["int8"] = _accuracy(qmodel, x, y)  # type: ignore[index]
        files.append("model_int8.pt")
    report["bytes"] = {f: (out / f).stat().st_size for f in files}
    (out / "export.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--step", type=int, default=None, help="default: the newest intact checkpoint")
    p.add_argument("--quantize", action="store_true", help="also write a dynamic int8 variant")
    args = p.parse_args(argv)
    report = export(args.run_dir, args.out, args.step, args.quantize)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
