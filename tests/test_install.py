"""Installable like any library: a wheel works from anywhere, with its configs and sbatch templates inside.

The slow tests build the wheel from a copy of the source tree, install it into a fresh venv (with the system
site-packages, so torch and hydra are reused, and --no-deps) and run it from a temporary directory, never
the checkout, with no PYTHONPATH: what a new user does after ``pip install torch-launchpad``. The machine's
editable install of this checkout is visible through the system site-packages too, so every test also checks
that what ran is the venv's copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, finish

from launcher import resources
from launcher.cli import main
from launcher.slurm import submit as slurm_submit

# what a build never needs; a copy keeps the checkout free of build/ and *.egg-info, and the wheel free of
# stale build/lib files (modules that have since moved)
TOP_LEVEL_SKIP = {".git", "build", "dist", "runs", "data", "docker", ".pytest_cache", ".ruff_cache"}


def _skip(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == ROOT
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (top and n in TOP_LEVEL_SKIP)}


def clean_env() -> dict[str, str]:
    """The environment without anything that points Python at the checkout (LAUNCHER_HOOKS: the tests' hooks,
    which live in the checkout only)."""
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LAUNCHER_HOOKS")}


def run(argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv, cwd=cwd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code, out, err = finish(proc, timeout)
    return subprocess.CompletedProcess(argv, code, out, err)


class Installed:
    def __init__(self, base: Path) -> None:
        self.src = base / "src"
        shutil.copytree(ROOT, self.src, ignore=_skip)
        wheels = base / "wheels"
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                                "-w", str(wheels), str(self.src)], env=clean_env(), capture_output=True, text=True,
                               timeout=600)
        assert build.returncode == 0, build.stdout + build.stderr
        [self.wheel] = wheels.glob("*.whl")
        self.venv = base / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(self.venv)], check=True,
                       env=clean_env(), timeout=300)
        self.python = self.venv / "bin" / "python"
        install = subprocess.run([str(self.python), "-m", "pip", "install", "--no-deps", "-q", str(self.wheel)],
                                 env=clean_env(), capture_output=True, text=True, timeout=600)
        assert install.returncode == 0, install.stdout + install.stderr
        self.cwd = base / "elsewhere"  # not the checkout: nothing there to find by accident
        self.cwd.mkdir()

    def site_packages(self) -> Path:
        out = run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], self.cwd)
        return Path(out.stdout.strip())


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return Installed(tmp_path_factory.mktemp("install"))


@pytest.mark.slow
def test_wheel_is_named_for_the_index_and_installs_the_import_names(installed: Installed) -> None:
    assert installed.wheel.name.startswith("torch_launchpad-")  # "launcher" is taken on PyPI
    out = run([str(installed.python), "-c", "import launcher, workers; from launcher import resources as r; "
               "print(launcher.__file__, workers.__file__, r.config_dir(), r.template_dir(), sep='\\n')"],
              installed.cwd)
    assert out.returncode == 0, out.stderr
    paths = [Path(p).resolve() for p in out.stdout.split()]
    venv = installed.venv.resolve()
    for path in paths:
        assert path.is_relative_to(venv) and not path.is_relative_to(ROOT), out.stdout
    assert (paths[2] / "config.yaml").is_file() and (paths[3] / "train.sbatch").is_file()


@pytest.mark.slow
def test_wheel_holds_every_module_config_and_template(installed: Installed) -> None:
    site = installed.site_packages()
    src = installed.src
    modules = {p.relative_to(src) for pkg in ("launcher", "workers") for p in (src / pkg).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules and not {m for m in modules if not (site / m).is_file()}
    configs = {p.relative_to(src / "configs") for p in (src / "configs").rglob("*.yaml")}
    assert Path("config.yaml") in configs
    assert configs == {p.relative_to(site / "launcher/_configs") for p in (site / "launcher/_configs").rglob("*.yaml")}
    templates = {p.name for p in (src / "slurm").glob("*.sbatch")}
    assert templates and templates == {p.name for p in (site / "launcher/_slurm").glob("*.sbatch")}
    assert not (site / "configs").exists() and not (site / "slurm").exists()  # nothing loose in site-packages
    # the product only: no benchmarks, no tests (their hooks stay in the checkout)
    with zipfile.ZipFile(installed.wheel) as wheel:
        tops = {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" not in name}
    assert tops == {"launcher", "workers"}, tops
    assert not (site / "bench").exists() and not (site / "tests").exists()


@pytest.mark.slow
def test_installed_demo_trains_from_another_directory(installed: Installed) -> None:
    run_dir = installed.cwd / "run"
    out = run([str(installed.python), "-m", "launcher", "--gpus", "2", "trainer.max_steps=20",
               "trainer.eval_every=10", "trainer.checkpoint_every=10", "--run-dir", str(run_dir)], installed.cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (run_dir / "result.json").is_file(), out.stdout[-3000:]


@pytest.mark.slow
def test_installed_slurm_dry_run_and_console_script(installed: Installed) -> None:
    slurm = run([str(installed.python), "-m", "launcher", "--slurm", "--nodes", "2", "--gpus", "1", "--dry-run"],
                installed.cwd)
    assert slurm.returncode == 0, slurm.stderr
    assert "#SBATCH --nodes=2" in slurm.stdout
    assert f"PYTHON={installed.python}" in slurm.stdout
    script = run([str(installed.venv / "bin" / "launcher"), "--gpus", "2", "--dry-run"], installed.cwd)
    assert script.returncode == 0, script.stderr
    assert "workers.train" in script.stdout
    assert str(ROOT) not in slurm.stdout + script.stdout  # nothing of the checkout: not even on PYTHONPATH
    assert "PYTHONPATH" not in script.stdout  # the installed package is importable as it is


# -- quick: the checkout's own layout, and a missing template ----------------------------------------------
def test_checkout_uses_the_top_level_directories() -> None:
    if resources.installed():
        pytest.skip("run from an installed wheel, not a checkout")
    assert resources.config_dir() == ROOT / "configs"
    assert resources.template_dir() == ROOT / "slurm"
    assert resources.source_root() == ROOT


def test_missing_template_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(slurm_submit, "TEMPLATES", tmp_path / "nowhere")
    monkeypatch.chdir(tmp_path)
    assert main(["--slurm", "--nodes", "2", "--gpus", "1", "--dry-run"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("launcher: error: sbatch template"), lines
