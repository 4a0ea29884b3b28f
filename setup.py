"""Package layout (the metadata is in pyproject.toml).

The built-in Hydra configs and the sbatch templates live at the top of the source tree (configs/, slurm/),
outside any package, and pip installs nothing outside a package's directory. So the wheel maps them in as
data-only packages, launcher/_configs and launcher/_slurm, which launcher/resources.py finds. The packages
are discovered, so new subpackages of launcher/ and workers/ need no entry here. bench/ and tests/ stay out:
they reach the ranks of a checkout through LAUNCHER_HOOKS (workers/hooks.py), never through the product.
"""

from setuptools import find_namespace_packages, setup

DATA_PACKAGES = {"launcher._configs": "configs", "launcher._slurm": "slurm"}  # see launcher/resources.py

setup(
    packages=[*find_namespace_packages(include=["launcher", "launcher.*", "workers", "workers.*"],
                                       exclude=["*.__pycache__"]),
              *DATA_PACKAGES],
    package_dir=DATA_PACKAGES,
)
