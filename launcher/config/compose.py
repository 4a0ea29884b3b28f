"""Compose the training config with Hydra and check it, and the user's targets, before any process starts."""

from __future__ import annotations

import contextlib
from pathlib import Path

from launcher import resources
from launcher.config import cache as compose_cache
from launcher.config import hydra as composition
from launcher.errors import UsageError
from workers import config as schema

DEFAULT_CONFIG_DIR = resources.config_dir()  # configs/ in a checkout, the packaged copy in a wheel


def compose_config(overrides: list[str], config_dir: Path = DEFAULT_CONFIG_DIR,
                   cache: Path | None = None) -> schema.Config:
    """configs/ + overrides -> a validated Config whose targets import and take their keys; any problem
    is a UsageError naming the key. Built-in presets as shipped are not imported (they are known to pass,
    and importing them would import torch into the launcher); every other target is, before anything starts.
    ``cache``: a directory of composed configs (launcher/config/cache.py): a hit skips Hydra altogether."""
    if not (config_dir / "config.yaml").is_file():
        raise UsageError(f"no config.yaml in --config-dir {config_dir}")
    name = compose_cache.key(overrides, (config_dir, DEFAULT_CONFIG_DIR)) if cache else None
    hit = compose_cache.get(cache, name) if cache and name else None
    cfg = None
    if hit is not None:  # written from a checked Config by this schema (its file is in the key): no OmegaConf
        with contextlib.suppress(schema.ConfigError, TypeError, KeyError):  # a damaged entry: compose again
            cfg, shipped = schema.from_plain(hit[0]), hit[1]
    if cfg is None:
        cfg, shipped = _compose(overrides, config_dir)
        if cache and name:
            compose_cache.put(cache, name, schema.to_dict(cfg), shipped)
    return _checked(cfg, shipped)


def _compose(overrides: list[str], config_dir: Path) -> tuple[schema.Config, set[str]]:
    # here, not at the top: a script after `--` needs no Hydra, and the import is a tenth of a second
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    shipped: set[str] = set()
    try:
        cfg = composition.compose(overrides, config_dir, builtin=DEFAULT_CONFIG_DIR, shipped=shipped)
    # Hydra raises plain ValueErrors too (e.g. `schedule=1`: a group choice that is not a name)
    except (HydraException, OmegaConfBaseException, schema.ConfigError, ValueError, TypeError, KeyError) as e:
        lines = [ln.strip().rstrip(".") for ln in str(e).strip().splitlines()[:2] if ln.strip()]
        reason = ": ".join(lines) or type(e).__name__
        raise UsageError(f"bad config override: {reason}. HINT: keys, choices and defaults are in "
                         f"{config_dir} (schema: workers/config.py)") from None
    return cfg, shipped


def _checked(cfg: schema.Config, shipped: set[str]) -> schema.Config:
    """``cfg`` once every target but the shipped presets imports and takes its keys (else a UsageError)."""
    from workers import task  # imports the targets' modules (torch among them): only once the config is sound

    try:
        task.check(cfg, skip=shipped)
    except task.TaskError as e:
        raise UsageError(str(e)) from None
    return cfg
