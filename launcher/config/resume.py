"""Safe resume: launching into a run directory that has checkpoints continues that run, so the config
must describe the same run.

What a checkpoint cannot carry over — another model, data, loss, optimizer type or mode — is exit 2
naming the keys that differ, and nothing in the run directory changes (``--no-resume`` starts over
instead). Changes a resumed run can take (more steps, another schedule or learning rate, logging,
checkpoint cadence, loader workers, metrics) are allowed; the config they replace is kept in
``config_history/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from launcher.errors import UsageError
from workers import config as schema
from workers import contract

# keys whose change a checkpoint can take: a prefix ("trainer.") or a whole key
HARMLESS = ("trainer.", "schedule.", "metrics.", "ddp.", "seed", "optimizer.",
            *(f"data.{k}" for k in schema.DATA_KEYS),
            *(f"online.{k}" for k in ("poll_s", "idle_timeout_s", "checkpoint_every_s", "window", "batch_size")))
STRUCTURAL = ("optimizer._target_",)  # under a harmless prefix, yet the optimizer state would not load


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_keys(old: schema.Config, new: schema.Config) -> tuple[list[str], list[str]]:
    """(keys a resume cannot take, keys it can) that differ between the two configs."""
    a, b = _flat(schema.to_dict(old)), _flat(schema.to_dict(new))
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k, "<unset>") != b.get(k, "<unset>"))
    harmless = [k for k in differ if k not in STRUCTURAL and (k in HARMLESS or k.startswith(HARMLESS))]
    return [k for k in differ if k not in harmless], harmless


def check(run_dir: Path, new: schema.Config, fresh: bool) -> Path | None:
    """Before anything starts. Raises UsageError for a resume with another model/data/optimizer type;
    returns the path the current config.yaml is to be kept at when harmless keys changed, else None."""
    path = contract.config_file(run_dir)
    if fresh or not path.is_file() or not any(contract.checkpoint_dir(run_dir).glob("step-*.json")):
        return None
    try:
        old = schema.load(path)
    except (schema.ConfigError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a config this version can resume ({str(e).splitlines()[0]}). "
                         "HINT: --no-resume starts over (earlier checkpoints are moved aside), or pass another "
                         "--run-dir/--name") from None
    structural, harmless = changed_keys(old, new)
    if structural:
        shown = ", ".join(structural[:6]) + (f" and {len(structural) - 6} more" if len(structural) > 6 else "")
        raise UsageError(f"{run_dir} holds checkpoints of another run: {shown} differ from its config.yaml. "
                         "HINT: --no-resume to start over there, or another --name/--run-dir")
    if not harmless:
        return None
    return run_dir / "config_history" / f"config-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
