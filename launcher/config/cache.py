"""Composed configs, cached: importing Hydra and composing take a quarter of a second, most of the launcher's own
start-up, and the same overrides on the same config files compose to the same config every time.

Key: the overrides, every YAML file of the config directories (path and content), the composition's own code
(``CODE``: workers/config.py and launcher/config/hydra.py, found by import) and the installed Hydra and OmegaConf.
Value: the composed config as plain data and the built-in nodes left as shipped. A hit goes through the schema's
dataclasses again (workers/config.py ``from_plain``: no OmegaConf import) and the user's targets are checked as on
every launch (launcher/config/compose.py), so bad input is still exit 2 before anything starts. Not cached: files or
overrides with a resolver (``${oc.env:…}``, ``${now:…}``: their value is not a function of the files) and
``hydra.*`` overrides (search paths, plugins). ``LAUNCHER_COMPOSE_CACHE=0`` turns it off; entries live in
``~/.cache/launcher/compose/`` (``$XDG_CACHE_HOME``), the newest ``KEEP`` of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from launcher.config import hydra as composition
from workers import config as schema
from workers.files import read_json, write_json

KEEP = 256  # entries; older ones are removed when a new one is written
MAX_FILES = 500  # a config directory with more YAML files than this is not hashed on every launch: not cached
RESOLVER = re.compile(r"\$\{\s*[\w.]+\s*:")  # ${name:...}: a resolver call, e.g. ${oc.env:HOME}
# what a composed config is a function of besides the files: found by import, so a move cannot leave a stale path
CODE = tuple(Path(module.__file__ or "-") for module in (schema, composition))


def directory(env: Mapping[str, str]) -> Path | None:
    """Where entries live; None when turned off (LAUNCHER_COMPOSE_CACHE=0)."""
    if env.get("LAUNCHER_COMPOSE_CACHE", "1") == "0":
        return None
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "launcher" / "compose"


def key(overrides: list[str], config_dirs: Iterable[Path]) -> str | None:
    """The entry's name for these overrides and config files, or None where the result may not be cached."""
    if any(RESOLVER.search(o) or o.lstrip("+~").startswith("hydra") for o in overrides):
        return None
    h = hashlib.sha256(json.dumps(overrides).encode())
    for source in (*CODE, *(_installed(name) for name in ("hydra", "omegaconf"))):
        h.update(source.read_bytes() if source.is_file() else b"-")
    for root in sorted({d.resolve() for d in config_dirs}):
        files = sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        if len(files) > MAX_FILES:
            return None
        for path in files:
            text = path.read_bytes()
            if RESOLVER.search(text.decode(errors="replace")):
                return None
            h.update(f"{path.relative_to(root)}\0{len(text)}\0".encode() + text)
        h.update(str(root).encode())
    return h.hexdigest()


def _installed(package: str) -> Path:
    """A file whose content changes with the package's version (its version module or __init__)."""
    spec = importlib.util.find_spec(package)
    origin = Path(spec.origin) if spec and spec.origin else Path("-")
    version = origin.parent / "version.py"
    return version if version.is_file() else origin


def get(folder: Path, name: str) -> tuple[dict[str, Any], set[str]] | None:
    with contextlib.suppress(KeyError, TypeError):  # None (missing, unreadable) or not an entry
        entry = read_json(folder / f"{name}.json")
        return entry["config"], set(entry["shipped"])
    return None


def put(folder: Path, name: str, config: dict[str, Any], shipped: set[str]) -> None:
    with contextlib.suppress(OSError):  # a cache: a read-only home only costs the compose next time
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{name}.json", {"config": config, "shipped": sorted(shipped)}, indent=None)
        entries = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP:]:
            old.unlink(missing_ok=True)
