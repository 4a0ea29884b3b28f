"""Compose the training config with Hydra and check it before any process starts."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from launcher.errors import UsageError
from workers import config as schema

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def compose_config(overrides: list[str], config_dir: Path = DEFAULT_CONFIG_DIR) -> schema.Config:
    """configs/ + overrides -> a validated Config; any problem is a UsageError naming the key."""
    if not (config_dir / "config.yaml").is_file():
        raise UsageError(f"no config.yaml in --config-dir {config_dir}")
    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            composed = compose(config_name="config", overrides=overrides)
        return schema.from_container(OmegaConf.to_container(composed, resolve=True))
    except (HydraException, OmegaConfBaseException, schema.ConfigError) as e:
        lines = [ln.strip().rstrip(".") for ln in str(e).strip().splitlines()[:2] if ln.strip()]
        reason = ": ".join(lines) or type(e).__name__
        raise UsageError(f"bad config override: {reason}. HINT: keys, choices and defaults are in "
                         f"{config_dir} (schema: workers/config.py)") from None
