"""Where the built-in Hydra configs and the sbatch templates are, in a checkout and in an installed wheel.

A source checkout keeps them at the top level (``configs/``, ``slurm/``, beside ``launcher/``). A wheel
ships copies inside the package, as ``launcher/_configs/`` and ``launcher/_slurm/`` (package data, mapped
from those top-level directories in setup.py), because nothing outside a package's own directory is
installed. The packaged copy wins when it is there; it never is in a checkout (builds go to build/).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

PACKAGED_CONFIGS = "_configs"  # launcher/_configs in a wheel <- configs/ in the source tree
PACKAGED_TEMPLATES = "_slurm"  # launcher/_slurm in a wheel <- slurm/ in the source tree


def _package_dir() -> Path:
    """The directory of the imported ``launcher`` package (a real one: wheels install unzipped)."""
    root = resources.files("launcher")
    if not isinstance(root, Path):  # e.g. a zipimport: Hydra and sbatch need real files
        raise RuntimeError(f"the launcher package at {root} is not a directory on disk; install it with pip")
    return root.resolve()


def installed() -> bool:
    """Whether ``launcher`` was imported from an installed wheel (its data inside the package)."""
    return (_package_dir() / PACKAGED_CONFIGS).is_dir()


def source_root() -> Path | None:
    """The checkout ``launcher`` was imported from (``launcher/``'s parent), or None for an installed wheel."""
    return None if installed() else _package_dir().parent


def pythonpath(env: Mapping[str, str]) -> str:
    """PYTHONPATH for a process we start (ranks, probes, the reaper): the checkout first, so ``-m workers.train``
    and ``-m launcher.…`` work from any working directory, then the caller's. An installed wheel needs nothing
    (its site-packages is on the path already, and must not go ahead of the standard library)."""
    root = str(source_root() or "")
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]  # not twice when already there
    return os.pathsep.join([root, *rest] if root else rest)


def config_dir() -> Path:
    """The built-in Hydra config directory (``config.yaml`` plus one subdirectory per group)."""
    root = source_root()
    return root / "configs" if root is not None else _package_dir() / PACKAGED_CONFIGS


def template_dir() -> Path:
    """The directory of the sbatch templates (``train.sbatch``, ``train_mpi.sbatch``)."""
    root = source_root()
    return root / "slurm" if root is not None else _package_dir() / PACKAGED_TEMPLATES
