"""``-m``/``--multirun``: a hyperparameter sweep, one normal run per member under one sweep directory.

``a=1,2 b=x,y`` (and ``range()``, ``choice()``, ``glob()``) are expanded by Hydra itself: its override parser
and its basic sweeper's cartesian product. Every member is composed and checked before anything starts (a bad
value in any member is exit 2), then members run one after another through the single-run code path
(``single.run_one``) into ``SWEEP_DIR/<index>-<swept key=value,…>/``. A member that fails is recorded and the
sweep goes on; a rerun skips finished members and resumes the others from their checkpoints. ``--slurm``
makes the members one job array instead. Other Hydra sweepers (``hydra/sweeper=optuna``): launcher/sweep/plugin.py.
Files (members.json, member.json, summary.csv): launcher/sweep/record.py.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import re
import shlex
import sys
import time
from pathlib import Path

from launcher import single
from launcher.backends import get_backend
from launcher.config import resume
from launcher.config.compose import compose_config
from launcher.errors import UsageError
from launcher.sweep import record
from launcher.sweep.record import Member
from workers import config as schema

STOPPED = (130, 143)  # a member ended by SIGINT/SIGTERM: the user stopped the sweep, not just that member
SWEEPER = re.compile(r"hydra/sweeper=(.+)")


def sweeper_choice(overrides: list[str]) -> str | None:
    """The Hydra sweeper named on the command line (``hydra/sweeper=optuna``), if any."""
    found = [m.group(1) for o in overrides if (m := SWEEPER.fullmatch(o))]
    return found[-1] if found else None


def member_name(index: int, width: int, params: dict[str, str]) -> str:
    """``<index>-<key=value,…>``: the index keeps names unique and in order; the swept values make them readable.
    Anything but letters, digits and ``_.,=+-`` becomes ``_`` (a path, a quote); long names are cut."""
    text = ",".join(f"{k}={v}" for k, v in params.items())
    safe = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", text)[:80]
    return f"{index:0{width}d}" + (f"-{safe}" if safe else "")


def expand(overrides: list[str], config_dir: Path) -> list[Member]:
    """The members of a grid sweep, in Hydra's order; their params are the swept keys' values."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir.resolve()), version_base=None):
            # the config loader lets glob() list a config group's choices
            parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
            parsed = parser.parse_overrides(overrides)
            [combos] = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        which = f" {e.override}" if isinstance(getattr(e, "override", None), str) else ""
        raise UsageError(f"bad sweep override{which}: {reason}. HINT: sweeps are a=1,2 b=range(1,4) c=choice(x,y) "
                         "d=glob(*); interval() needs a sweeper plugin (hydra/sweeper=optuna)") from None
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    width = len(str(max(len(combos) - 1, 0)))
    members = []
    for index, combo in enumerate(combos):
        params = {key.lstrip("+~"): value for key, value in (item.split("=", 1) for item in combo) if key in swept}
        members.append(Member(index=index, name=member_name(index, width, params), overrides=combo, params=params))
    return members


def check_member(args: argparse.Namespace, sweep_dir: Path, member: Member) -> schema.Config:
    """Compose the member's config and check it resumes cleanly in its run directory; a UsageError names it.
    Sets the member's max_steps (what "finished" means for it)."""
    try:
        cfg = compose_config(member.overrides, args.config_dir)
        resume.check(member.run_dir(sweep_dir), cfg, args.no_resume)
    except UsageError as e:
        raise UsageError(f"sweep member {member.name} ({' '.join(member.overrides)}): {e}") from None
    member.max_steps = cfg.trainer.max_steps
    return cfg


def check_launch(args: argparse.Namespace, sweep_dir: Path, member: Member, cfg: schema.Config) -> None:
    """What a launch checks before it starts anything (flags, the plan, the backend), once, before the sweep writes
    anything: the same for every member. The dry run's printout is not wanted here."""
    with contextlib.redirect_stdout(io.StringIO()):
        single.run_one(member_args(args, sweep_dir, member, dry_run=True), [], cfg)
    problem = get_backend(args.backend).check_available()
    if problem:
        raise UsageError(problem)


def member_args(args: argparse.Namespace, sweep_dir: Path, member: Member,
                dry_run: bool | None = None) -> argparse.Namespace:
    one = copy.copy(args)
    one.run_dir, one.overrides, one.multirun = member.run_dir(sweep_dir), list(member.overrides), False
    one.dry_run = args.dry_run if dry_run is None else dry_run
    return one


def run_member(args: argparse.Namespace, sweep_dir: Path, member: Member, cfg: schema.Config,
               total: int | None, first: bool) -> int | None:
    """One member, as a single run would go: skipped when it finished earlier (None), else launched (resuming
    from its checkpoint); its status goes to member.json and summary.csv is rewritten. Returns its exit code.
    ``first``: nothing of this sweep has started yet, so a usage error (a flag the launch checks) is exit 2."""
    run_dir = member.run_dir(sweep_dir)
    label = f"sweep member {member.index + 1}{f'/{total}' if total else ''} {member.name}"
    if not args.no_resume and member.max_steps is not None and record.finished(run_dir, member.max_steps):
        print(f"launcher: {label}: finished earlier, skipped", flush=True)
        record.update_status(run_dir, member, status="finished", exit_code=0)
        record.write_summary(sweep_dir)
        return None
    print(f"launcher: {label}: starting ({shlex.join(member.overrides)})", flush=True)
    before = record.update_status(run_dir, member, status="running", exit_code="")
    started = time.monotonic()
    try:
        code = single.run_one(member_args(args, sweep_dir, member), [], cfg)
    except UsageError as e:  # a flag only the launch itself checks (the same for every member)
        if first:
            record.update_status(run_dir, member, status="pending")
            raise
        print(f"launcher: error: {e}", file=sys.stderr, flush=True)
        code = e.exit_code
    except KeyboardInterrupt:  # between the supervisor's handlers (it forwards Ctrl-C to the ranks itself)
        code = 130
    state = "finished" if code == 0 else "stopped" if code in STOPPED else "failed"
    record.update_status(run_dir, member, status=state, exit_code=code,
                         wall_s=before.get("wall_s", 0.0) + time.monotonic() - started)
    record.write_summary(sweep_dir)
    print(f"launcher: {label}: {state}" + (f" (exit {code})" if code else ""), flush=True)
    return code


def report(sweep_dir: Path, codes: dict[str, int], total: int) -> int:
    """The sweep's closing lines; its exit code: 0, or the first failed member's."""
    summary = sweep_dir / record.SUMMARY
    failed = [(name, code) for name, code in codes.items() if code]
    stopped = [name for name, code in failed if code in STOPPED]
    if stopped:
        print(f"launcher: sweep stopped at member {stopped[0]} ({len(codes)} of {total} started); run the same "
              f"command again to resume it (finished members are skipped); summary: {summary}", file=sys.stderr)
        return codes[stopped[0]]
    if failed:
        shown = ", ".join(f"{name} (exit {code})" for name, code in failed)
        rest = f"; the other {len(codes) - len(failed)} finished" if len(codes) > len(failed) else ""
        print(f"launcher: sweep {sweep_dir}: {len(failed)} of {total} members failed: {shown}{rest}. Summary: "
              f"{summary}; rerun the same command to retry the failed ones", file=sys.stderr)
        return failed[0][1]
    print(f"launcher: sweep {sweep_dir}: all {total} members finished. Summary: {summary}; compare them: "
          f"tensorboard --logdir {sweep_dir} (HPARAMS tab)")
    return 0


def check_multirun(args: argparse.Namespace, program: list[str]) -> None:
    """What every sweep (the grid here, a plugin's in plugin.py) refuses."""
    if program:
        raise UsageError("-m/--multirun sweeps config overrides of the built-in trainer, not a script after `--`")
    if args.max_parallel and not args.slurm:
        raise UsageError("--max-parallel applies to --slurm sweeps (a job array); here members run one after "
                         "another")


def run(args: argparse.Namespace) -> int:
    """``python -m launcher -m …`` (a grid): expand, check every member, then run them here, one after another (or
    submit one Slurm job array, or print them: --dry-run). See launcher/__init__.py, Sweeps."""
    sweep_dir = single.run_dir_of(args)
    if args.objective:
        raise UsageError("--objective is the value a sweeper plugin optimizes (hydra/sweeper=optuna); the grid "
                         "runs every member")
    members = expand([o for o in args.overrides if o != "hydra/sweeper=basic"], args.config_dir)
    configs = [check_member(args, sweep_dir, m) for m in members]  # all of them before anything starts
    if args.slurm:
        return submit_array(args, sweep_dir, members)
    if args.dry_run:
        print(f"launcher: dry run, nothing started; sweep of {len(members)} members in {sweep_dir}:")
        print("".join(f"  {m.name}: {shlex.join(m.overrides)}\n" for m in members), end="")
        for m, cfg in zip(members, configs, strict=True):
            print(f"launcher: sweep member {m.name} ({m.run_dir(sweep_dir)}):", flush=True)
            single.run_one(member_args(args, sweep_dir, m), [], cfg)
        return 0
    check_launch(args, sweep_dir, members[0], configs[0])
    record.write_members(sweep_dir, members)
    record.write_summary(sweep_dir)
    print(f"launcher: sweep of {len(members)} members in {sweep_dir}, one after another", flush=True)
    codes: dict[str, int | None] = {}
    for m, cfg in zip(members, configs, strict=True):
        code = run_member(args, sweep_dir, m, cfg, len(members), first=all(c is None for c in codes.values()))
        codes[m.name] = code
        if code in STOPPED:
            break
    return report(sweep_dir, {name: code or 0 for name, code in codes.items()}, len(members))


def submit_array(args: argparse.Namespace, sweep_dir: Path, members: list[Member]) -> int:
    """One sbatch job array, a task per member (``--array=0-N[%K]``); each task reads its member from
    SWEEP_DIR/members.json and runs it like a single job: requeued on preemption, resumed from its checkpoint."""
    last, most = len(members) - 1, args.max_parallel
    array = f"0-{last}" + (f"%{most}" if most and most <= last else "")
    if args.dry_run:
        print(f"launcher: sweep of {len(members)} members as Slurm job array {array} in {sweep_dir}:")
        print("".join(f"  task {m.index}: {m.name}: {shlex.join(m.overrides)}\n" for m in members), end="")
    else:
        record.write_members(sweep_dir, members)
        record.write_summary(sweep_dir)
    whole = copy.copy(args)
    whole.run_dir, whole.overrides = sweep_dir, []  # each task adds its member's overrides
    return single.slurm_job(whole, [], array=array)
