"""`--slurm` rendering without Slurm: golden #SBATCH blocks, quoting, and names that try to inject."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.errors import UsageError
from launcher.slurm.submit import SlurmOptions, render, sbatch_lines, template_for

RUN = Path("/scratch/runs/r1")
BASE = SlurmOptions(nodes=2, gpus_per_node=8, request_gpus=True, run_dir=RUN, python="/usr/bin/python3")
TAIL = ["#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
        "#SBATCH --output=/scratch/runs/r1/slurm-%j.out"]


@pytest.mark.parametrize(
    ("changes", "lines"),
    [
        ({}, ["#SBATCH --job-name=launcher", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
              "#SBATCH --gpus-per-node=8", *TAIL]),
        ({"partition": "gpu", "time": "04:00:00", "account": "proj", "qos": "high", "constraint": "a100&ib",
          "cpus_per_task": 32, "job_name": "bert-base"},
         ["#SBATCH --job-name=bert-base", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
          "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=32", "#SBATCH --partition=gpu",
          "#SBATCH --time=04:00:00", "#SBATCH --account=proj", "#SBATCH --qos=high",
          "#SBATCH --constraint=a100&ib", *TAIL]),
        ({"request_gpus": False, "nodes": 1, "signal_s": 300, "extra_sbatch": ("--mem=64G", "--exclusive")},
         ["#SBATCH --job-name=launcher", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
          "#SBATCH --signal=B:USR1@300", *TAIL[1:], "#SBATCH --mem=64G", "#SBATCH --exclusive"]),
    ],
    ids=["defaults", "all-flags", "cpu-only-extra-lines"],
)
def test_sbatch_lines_golden(changes: dict, lines: list[str]) -> None:
    assert sbatch_lines(replace(BASE, **changes)) == lines


def test_rendered_script_fills_every_block() -> None:
    opts = replace(BASE, setup=("module load cuda/12.4", "source ~/venv/bin/activate"),
                   args=("optimizer=adamw", "trainer.max_steps=20000"))
    text = render(template_for("torchrun").read_text(), opts)
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --output=runs/slurm-%x-%j.out" not in text  # the template's defaults are replaced
    assert "#SBATCH --nodes=2\n" in text and "#SBATCH --gpus-per-node=8\n" in text
    assert "module load cuda/12.4\nsource ~/venv/bin/activate\n# ---- end launcher:setup ----" in text
    assert ("RUN_DIR=/scratch/runs/r1\nPYTHON=/usr/bin/python3\nGPUS_PER_NODE=8\n"
            "set -- optimizer=adamw trainer.max_steps=20000\n# ---- end launcher:job ----") in text
    assert 'srun --ntasks-per-node=1' in text and 'scontrol requeue "$JOB"' in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)  # valid bash
    mpi = render(template_for("mpi").read_text(), replace(BASE, backend="horovod"))
    assert "BACKEND=horovod\n" in mpi and '-m launcher --backend "${BACKEND:-mpi}"' in mpi


def test_arguments_with_shell_metacharacters_arrive_as_they_were(tmp_path: Path) -> None:
    """Quoted, not executed: the job block run by bash yields exactly the original words."""
    hostile = ("data.path=/tmp/a b", "x=$(touch pwned)", "y=`id`;rm -rf ~", "z='quoted'\"double\"")
    text = render(template_for("torchrun").read_text(),
                  replace(BASE, run_dir=tmp_path / "run;touch&pwned$x", args=hostile))
    job = text.split("# ---- launcher:job")[1].split("\n", 1)[1].split("# ---- end launcher:job ----")[0]
    out = subprocess.run(["bash", "-c", job + 'printf "%s\\n" "$RUN_DIR" "$@"'], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines() == [str(tmp_path / "run;touch&pwned$x"), *hostile]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"partition": "gpu;rm -rf ~"}, "--partition 'gpu;rm -rf ~'"),
        ({"account": "$(whoami)"}, "--account"),
        ({"qos": "a b"}, "--qos"),
        ({"time": "04:00:00; id"}, "--time"),
        ({"job_name": "x\n#SBATCH --uid=0"}, "--job-name"),
        ({"constraint": "a100 && `id`"}, "--constraint"),
        ({"extra_sbatch": ("--mem=1G\nid",)}, "single line"),
        ({"extra_sbatch": ("mem=1G",)}, "expected one sbatch option"),
        ({"extra_sbatch": ("--mem=1G --uid=0",)}, "expected one sbatch option"),
        ({"setup": ("module load x\nid",)}, "single line"),
    ],
)
def test_injection_attempts_are_rejected(changes: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace("$", r"\$")):
        render(template_for("torchrun").read_text(), replace(BASE, **changes))


def test_dry_run_prints_the_script_and_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    code = main(["--slurm", "--nodes", "2", "--gpus", "8", "--partition", "gpu", "--time", "04:00:00",
                 "--account", "proj", "--run-dir", str(run_dir), "--dry-run", "optimizer=adamw"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("launcher: dry run, nothing submitted; the sbatch script:\n#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00",
                 "#SBATCH --account=proj", "set -- optimizer=adamw"):
        assert line + "\n" in out
    assert not run_dir.exists()


def test_bad_partition_through_the_cli_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--slurm", "--partition", "gpu;id", "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("launcher: error: --partition 'gpu;id'")
    assert not (tmp_path / "run").exists()
