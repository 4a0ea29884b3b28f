"""``--slurm``: fill in a template from slurm/ and submit it with ``sbatch --parsable``.

:func:`render` is pure (template text + options -> script text), so the scripts are tested as golden
text. Every value that lands in the script is validated (names) or quoted with ``shlex`` (paths,
arguments): a partition called ``gpu;rm -rf ~`` is an error, never a command.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launcher import resources
from launcher.errors import UsageError

TEMPLATES = resources.template_dir()  # slurm/ in a checkout, the packaged copy in a wheel
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")  # partition, account, qos, job name
TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}|\d+-\d+|UNLIMITED|INFINITE", re.IGNORECASE)
CONSTRAINT = re.compile(r"[A-Za-z0-9_.\-&|,*:\[\]]+")  # Slurm's feature expressions: a&b, [x|y], c*2
ARRAY = re.compile(r"0-\d+(%[1-9]\d*)?")  # a sweep's tasks: 0-N, at most K at once with %K


@dataclass(frozen=True, kw_only=True)
class SlurmOptions:
    nodes: int
    gpus_per_node: int
    request_gpus: bool  # --gpus-per-node in the request (False on a cluster without GPU GRES)
    job_name: str = "launcher"
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    cpus_per_task: int | None = None
    signal_s: int = 120  # USR1 this long before the time limit
    extra_sbatch: tuple[str, ...] = ()  # more #SBATCH options, e.g. "--mem=64G"
    setup: tuple[str, ...] = ()  # shell lines run before training (module load, conda activate)
    run_dir: Path
    python: str
    args: tuple[str, ...] = field(default_factory=tuple)  # the launcher's arguments on every node
    backend: str = "torchrun"
    array: str | None = None  # a sweep (launcher/sweep/multirun.py): one task per member of run_dir/members.json


def _check(flag: str, value: str | None, pattern: re.Pattern[str]) -> None:
    if value is not None and not pattern.fullmatch(value):
        raise UsageError(f"{flag} {value!r}: not a valid Slurm value (letters, digits, _ . -; "
                         f"time as [D-]HH:MM:SS). HINT: check the name with sinfo / sacctmgr")


def _one_line(flag: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise UsageError(f"{flag} {value!r}: must be a single line")


def sbatch_lines(o: SlurmOptions) -> list[str]:
    _check("--job-name", o.job_name, NAME)
    for flag, value in (("--partition", o.partition), ("--account", o.account), ("--qos", o.qos)):
        _check(flag, value, NAME)
    _check("--time", o.time, TIME)
    _check("--constraint", o.constraint, CONSTRAINT)
    _check("--array", o.array, ARRAY)
    opts = [f"--job-name={o.job_name}", f"--nodes={o.nodes}", "--ntasks-per-node=1"]
    if o.request_gpus:
        opts.append(f"--gpus-per-node={o.gpus_per_node}")
    if o.cpus_per_task:
        opts.append(f"--cpus-per-task={o.cpus_per_task}")
    opts += [f"--{k}={v}" for k, v in (("partition", o.partition), ("time", o.time), ("account", o.account),
                                       ("qos", o.qos), ("constraint", o.constraint)) if v]
    if o.array:
        opts.append(f"--array={o.array}")
    opts += [f"--signal=B:USR1@{o.signal_s}", "--requeue", "--open-mode=append",
             f"--output={o.run_dir}/slurm-{'%A_%a' if o.array else '%j'}.out"]
    for extra in o.extra_sbatch:
        _one_line("--sbatch", extra)
        if not extra.startswith("--") or " " in extra.strip():
            raise UsageError(f"--sbatch {extra!r}: expected one sbatch option, e.g. --sbatch=--mem=64G")
        opts.append(extra.strip())
    for line in opts:
        if any(c.isspace() for c in line):  # a space would end the #SBATCH option early
            raise UsageError(f"sbatch option {line!r} contains whitespace (#SBATCH lines cannot quote). "
                             "HINT: a run directory without spaces")
    return [f"#SBATCH {line}" for line in opts]


def _replace_block(text: str, name: str, lines: Sequence[str]) -> str:
    """Replace the lines between ``# ---- launcher:NAME`` and ``# ---- end launcher:NAME ----``."""
    start, end = f"# ---- launcher:{name}", f"# ---- end launcher:{name} ----"
    head, found, rest = text.partition(start)
    marker_line, _, rest = rest.partition("\n")
    _, found_end, tail = rest.partition(end)
    if not found or not found_end:
        raise ValueError(f"template lacks the launcher:{name} block")
    return head + start + marker_line + "\n" + "".join(f"{line}\n" for line in lines) + end + tail


def render(template: str, o: SlurmOptions) -> str:
    """The template with its #SBATCH, setup and job blocks filled in from ``o``."""
    for line in o.setup:
        _one_line("--setup", line)
    job = [f"{'SWEEP_DIR' if o.array else 'RUN_DIR'}={shlex.quote(str(o.run_dir))}", f"PYTHON={shlex.quote(o.python)}",
           f"GPUS_PER_NODE={o.gpus_per_node}"]
    if o.backend != "torchrun":
        job.append(f"BACKEND={shlex.quote(o.backend)}")
    job.append("set -- " + shlex.join(o.args) if o.args else "set --")
    text = _replace_block(template, "sbatch", sbatch_lines(o))
    text = _replace_block(text, "setup", list(o.setup))
    text = _replace_block(text, "job", job + (SWEEP_TASK if o.array else []))
    return _replace_block(text, "after", SWEEP_TASK_END if o.array else [])


# A sweep's array task: its member (run directory, then overrides) from SWEEP_DIR/members.json, as NUL-separated
# words (no word is ever parsed by the shell); a member that finished in an earlier submission is skipped.
SWEEP_TASK = [
    'mapfile -d "" -t member < <("$PYTHON" -m launcher.sweep.record start "$SWEEP_DIR" "$SLURM_ARRAY_TASK_ID")',
    'if [ "${member[0]:-}" = skip ]; then echo "slurm: sweep member $SLURM_ARRAY_TASK_ID finished earlier"; exit 0; fi',
    '[ "${member[0]:-}" = run ] || { echo "slurm: no sweep member $SLURM_ARRAY_TASK_ID in $SWEEP_DIR" >&2; exit 2; }',
    'RUN_DIR=${member[1]}',
    'set -- "$@" "${member[@]:2}"',
]
# how it ended (exit code, preempted) into its member.json, and summary.csv rewritten
SWEEP_TASK_END = ['"$PYTHON" -m launcher.sweep.record end "$SWEEP_DIR" "$SLURM_ARRAY_TASK_ID" "$code" "$preempted" '
                  '|| true']


def template_for(backend: str) -> Path:
    path = TEMPLATES / ("train.sbatch" if backend == "torchrun" else "train_mpi.sbatch")
    if not path.is_file():
        raise UsageError(f"sbatch template {path} not found: this installation lacks its slurm/ templates. "
                         "HINT: reinstall the package (pip install .), or run from a source checkout")
    return path


def cluster_has_gpus(partition: str | None) -> bool:
    """Whether the cluster (or partition) has GPU GRES at all; without, the job asks for CPUs only."""
    argv = ["sinfo", "--noheader", "--format=%G"] + ([f"--partition={partition}"] if partition else [])
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: ask for what the user said
    return "gpu" in out


def submit(script: Path, wait: bool) -> tuple[str, int]:
    """``sbatch --parsable [--wait] SCRIPT`` -> (job id, sbatch's exit code: the job's with --wait)."""
    argv = ["sbatch", "--parsable", *(["--wait"] if wait else []), str(script)]
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise UsageError("sbatch not found: --slurm needs Slurm's client tools on this machine") from None
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()  # the job id comes at once, even with --wait
    job_id = first.split(";")[0]
    if job_id:
        print(f"launcher: submitted Slurm job {job_id}; logs: {script.parent}/slurm-{job_id}.out"
              + ("; waiting for it to end" if wait else f"; follow with: squeue -j {job_id}"), flush=True)
    code = proc.wait()
    err = proc.stderr.read().strip() if proc.stderr else ""
    if not job_id:
        raise UsageError(f"sbatch refused the job: {err.splitlines()[-1] if err else f'exit {code}'}")
    return job_id, code
