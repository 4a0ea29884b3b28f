"""Hydra composition, the launcher's side of the config: ``configs/`` + command-line overrides -> a Config
checked against the ranks' schema (workers/config.py). Only the launcher composes; the ranks read the resolved
YAML it writes into the run directory, without Hydra.

Hydra and OmegaConf are imported inside the functions that use them: a hit of the compose cache
(launcher/config/cache.py, whose key hashes this file) and a script after ``--`` never import them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workers.config import DATA_KEYS, OPTIMIZER_KEYS, Config, from_container

# `_target_` nodes: switching a node's target on the command line drops the keys its preset gave
# (they belong to the old target), except these, which mean the same for any target
TARGET_NODES = {"model": (), "data": DATA_KEYS, "loss": (), "optimizer": ("lr", "weight_decay", *OPTIMIZER_KEYS)}


def _key(override: str) -> str:
    """The dotted key an override sets: `++model.depth=3` -> `model.depth`."""
    return override.lstrip("+~").split("=", 1)[0]


def _explicit(overrides: list[str], node: str) -> set[str]:
    """Keys of `node` set on the command line (node.key=…, +node.key=…, ++node.key=…)."""
    keys = set()
    for o in overrides:
        key = _key(o)
        if key.startswith(node + "."):
            keys.add(key[len(node) + 1 :].split(".", 1)[0])
    return keys


def _shipped(raw: Any, overrides: list[str], groups: set[str]) -> set[str]:
    """The `_target_` nodes of a config composed from the built-in ``configs/`` alone that are one of its presets
    exactly as shipped: a target of ours (``workers.*``, ``torch.*``); no key of the node set on the command line
    but the trainer's own (``TARGET_NODES``: the loader's, the LR), which do not change what its check sees; and
    no interpolation, whose value comes from elsewhere (gpt's ``vocab: ${data.vocab_size}``). Choosing a preset
    (``model=gpt``, one of ``groups``) keeps it shipped. Such a node's check (workers/task.py: import, signature,
    a meta build) is known to pass; the check would import torch into the launcher for nothing."""
    from omegaconf import OmegaConf

    keys = {_key(o) for o in overrides}
    if any(k.split(".")[0] == "hydra" for k in keys):  # e.g. a search path of the user's: groups may be theirs
        return set()
    out = set()
    for node in [*TARGET_NODES, *(f"metrics.{name}" for name in raw.get("metrics") or {})]:
        value = OmegaConf.select(raw, node)
        if not OmegaConf.is_dict(value):
            continue
        value = OmegaConf.to_container(value, resolve=False)
        own = TARGET_NODES.get(node, ())
        set_here = [k for k in keys if (k == node and node not in groups)
                    or (k.startswith(node + ".") and k[len(node) + 1 :].split(".")[0] not in own)]
        ours = str(value.get("_target_", "")).startswith(("workers.", "torch."))
        if ours and not set_here and "${" not in str(value):
            out.add(node)
    return out


def user_overrides(overrides: list[str]) -> list[str]:
    """`model.depth=3` adds depth when the preset lacks it: a `_target_` node takes whatever its target does
    (the target's signature is checked later), so the `+` Hydra would want is written for the user."""
    nodes = (*TARGET_NODES, "metrics")
    return [f"++{o}" if o[:1] not in "+~" and "=" in o and "." in _key(o) and _key(o).split(".", 1)[0] in nodes
            else o for o in overrides]


def compose(overrides: list[str], config_dir: Path, builtin: Path | None = None,
            shipped: set[str] | None = None) -> Config:
    """``configs/`` + command-line overrides -> a checked Config (Hydra, composed once).

    ``builtin``: the built-in config directory, put on Hydra's search path behind ``config_dir`` (a user's
    ``--config-dir``), whose ``config.yaml`` can then include ``base`` and pick built-in groups.

    When an override changes a node's ``_target_`` (``model._target_=my_pkg.Net``), the keys the
    group's preset gave for its own target are dropped, so only the keys written on the command line
    (and the trainer's own, ``TARGET_NODES``) reach the new target.

    ``shipped``: when given, filled with the ``_target_`` nodes that are a built-in preset exactly as
    shipped (see :func:`_shipped`), which the launcher need not import and check before starting."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    user = user_overrides(overrides)
    if builtin is not None and builtin.resolve() != config_dir.resolve():
        user.append(f"hydra.searchpath=['file://{builtin.resolve()}']")
    with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
        raw = hydra_compose(config_name="config", overrides=user)
        composed = OmegaConf.to_container(raw, resolve=True)
        if shipped is not None and builtin is not None and builtin.resolve() == config_dir.resolve():
            shipped.update(_shipped(raw, overrides, groups={d.name for d in builtin.iterdir() if d.is_dir()}))
        switched = [n for n in TARGET_NODES if f"{n}._target_" in {_key(o) for o in user}]
        if switched:  # the presets without the command line's keys for those nodes: what to drop
            base_overrides = [o for o in user if "." not in _key(o) or _key(o).split(".", 1)[0] not in switched]
            base = OmegaConf.to_container(hydra_compose(config_name="config", overrides=base_overrides), resolve=True)
    assert isinstance(composed, dict)
    if "metrics={}" in overrides:  # Hydra merges a dict into a dict: `{}` here means "no metrics"
        composed["metrics"] = {}
    for node in switched:
        keep = {"_target_", *TARGET_NODES[node], *_explicit(overrides, node)}
        preset = base.get(node) or {}  # type: ignore[union-attr]
        composed[node] = {k: v for k, v in composed[node].items() if k in keep or k not in preset}
    return from_container(composed)
