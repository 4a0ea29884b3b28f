"""``-m hydra/sweeper=NAME``: a Hydra sweeper plugin (e.g. hydra-optuna-sweeper) drives the sweep.

Such a sweeper proposes members from the results of earlier ones, so there is no list up front: Hydra's own
API composes the Hydra config (``RunMode.MULTIRUN``) and instantiates the sweeper, and its ``launcher`` is
replaced by :class:`MemberLauncher`, which runs each proposed member like a grid member (launcher/sweep/multirun.py:
its own run directory, checked, resumed, recorded) and hands back ``--objective`` from the member's
result.json (``train/loss``: its TensorBoard) as the job's return value. Members run here, one after another;
a job array cannot wait for results, so ``--slurm`` is refused.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

from launcher.config.compose import DEFAULT_CONFIG_DIR
from launcher.config.hydra import user_overrides
from launcher.errors import UsageError
from launcher.sweep import multirun as sweep
from launcher.sweep import record
from launcher.sweep.record import Member
from workers import config as schema

DEFAULT_OBJECTIVE = "test/loss"


def installed() -> list[str]:
    """Sweepers Hydra knows here: basic, plus those of installed plugins (scanning hydra_plugins registers them)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()
    return sorted(n.removesuffix(".yaml") for n in ConfigStore.instance().list("hydra/sweeper") if n.endswith(".yaml"))


class _Stop(Exception):
    """A member was stopped by SIGINT/SIGTERM: the whole sweep stops (a rerun resumes it)."""


class MemberLauncher(Launcher):
    """Hydra's Launcher interface over the launcher's members: each proposed override list is one member."""

    def __init__(self, args: argparse.Namespace, sweep_dir: Path, fixed: set[str], width: int) -> None:
        self.args, self.sweep_dir, self.fixed, self.width = args, sweep_dir, fixed, width
        self.members: list[Member] = []
        self.codes: dict[str, int] = {}
        self.launched = False  # a member has started: from then on a usage error is that member's failure
        self.objective = args.objective or DEFAULT_OBJECTIVE

    def setup(self, **_: Any) -> None:  # the sweeper's setup() made Hydra's own launcher; this one needs nothing
        pass

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return [self.run(list(ovs), initial_job_idx + i) for i, ovs in enumerate(job_overrides)]

    def run(self, overrides: list[str], index: int) -> JobReturn:
        params = {k.lstrip("+~"): v for k, v in (o.split("=", 1) for o in overrides) if k not in self.fixed}
        member = Member(index=index, name=sweep.member_name(index, self.width, params), overrides=overrides,
                        params=params)
        ret = JobReturn(overrides=overrides, working_dir=str(member.run_dir(self.sweep_dir)), task_name="launcher")
        cfg: schema.Config | None = None
        try:
            cfg = sweep.check_member(self.args, self.sweep_dir, member)
        except UsageError as e:
            if not self.launched:  # nothing has started yet: bad input (exit 2)
                raise
            print(f"launcher: error: {e}", file=sys.stderr, flush=True)
            member.max_steps, code = -1, e.exit_code
            record.update_status(member.run_dir(self.sweep_dir), member, status="failed", exit_code=code)
        self.members.append(member)
        record.write_members(self.sweep_dir, self.members)
        if cfg is not None and not self.launched:
            sweep.check_launch(self.args, self.sweep_dir, member, cfg)
        if cfg is not None:
            ran = sweep.run_member(self.args, self.sweep_dir, member, cfg, None, first=not self.launched)
            self.launched = self.launched or ran is not None  # None: it had finished earlier, skipped
            code = ran or 0
        self.codes[member.name] = code
        if code in sweep.STOPPED:
            raise _Stop
        value = self.value(member.run_dir(self.sweep_dir)) if code == 0 else None
        if value is None:
            ret.status = JobStatus.FAILED
            why = f"exit {code}" if code else f"no {self.objective} in its result.json"
            ret.return_value = RuntimeError(f"sweep member {member.name}: {why}")
        else:
            ret.status, ret.return_value = JobStatus.COMPLETED, value
        return ret

    def value(self, run_dir: Path) -> float | None:
        if self.objective == "train/loss":
            return record.final_train_loss(run_dir)
        found = record.result(run_dir).get(self.objective)
        return float(found) if isinstance(found, (int, float)) else None


def attach(sweeper: Any, launcher: MemberLauncher, name: str) -> None:
    """Put ``launcher`` where the sweeper calls it: on the sweeper, or on the implementation object the Optuna,
    Nevergrad and Ax plugins wrap (``.sweeper``)."""
    targets = [obj for obj in (sweeper, getattr(sweeper, "sweeper", None)) if hasattr(obj, "launcher")]
    if not targets:
        raise UsageError(f"hydra/sweeper={name}: this sweeper keeps no `launcher` to hand members to. HINT: the grid "
                         "(no hydra/sweeper) and hydra/sweeper=optuna are supported")
    for obj in targets:
        obj.launcher = launcher


def compose_sweeper(args: argparse.Namespace, name: str, sweep_dir: Path, launcher_of: Any) -> tuple[Any, list[str]]:
    """Hydra's multirun start (Hydra.multirun, without its own launcher and logging): (the sweeper, the task
    overrides it sweeps over)."""
    from hydra import initialize_config_dir
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.plugins import Plugins
    from hydra.errors import HydraException
    from hydra.types import HydraContext, RunMode
    from omegaconf import OmegaConf, open_dict, read_write
    from omegaconf.errors import OmegaConfBaseException

    try:
        # the `++` a _target_ node's new keys need (compose_config adds it too); this compose leaves sweeps out
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        overrides = [o if p.is_sweep_override() else user_overrides([o])[0]
                     for o, p in zip(args.overrides, parsed, strict=True)]
        if args.config_dir.resolve() != DEFAULT_CONFIG_DIR.resolve():
            overrides.append(f"hydra.searchpath=['file://{DEFAULT_CONFIG_DIR.resolve()}']")
        with initialize_config_dir(config_dir=str(args.config_dir.resolve()), version_base=None):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None
            cfg = hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN, with_log_configuration=False)
            with read_write(cfg), open_dict(cfg):
                cfg.hydra.sweep.dir = str(sweep_dir)  # where the sweeper writes its own results
            context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(cfg))
            sweeper = Plugins.instance().instantiate_sweeper(config=cfg, hydra_context=context,
                                                             task_function=lambda _cfg: None)
    except (HydraException, OmegaConfBaseException, ValueError, ImportError) as e:
        reason = ": ".join(ln.strip() for ln in str(e).strip().splitlines()[:2] if ln.strip()) or type(e).__name__
        raise UsageError(f"hydra/sweeper={name}: {reason}") from None
    task = OmegaConf.to_container(cfg.hydra.overrides.task)
    assert isinstance(task, list)
    n_trials = OmegaConf.select(cfg, "hydra.sweeper.n_trials")
    attach(sweeper, launcher_of(task, len(str(n_trials - 1)) if isinstance(n_trials, int) and n_trials > 1 else 3),
           name)
    return sweeper, [str(t) for t in task]


def run(args: argparse.Namespace, name: str, sweep_dir: Path) -> int:
    known = installed()
    if name not in known:
        raise UsageError(f"hydra/sweeper={name} is not installed; sweepers here: {', '.join(known)}. HINT: pip install "
                         f"hydra-{name}-sweeper, or leave hydra/sweeper out for a grid of every combination")
    if args.slurm:
        raise UsageError(f"hydra/sweeper={name} proposes members from earlier members' results, so it cannot become "
                         "one Slurm job array. HINT: run it here, or sweep a grid (no hydra/sweeper) with --slurm")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    holder: dict[str, MemberLauncher] = {}

    def launcher_of(task: list[str], width: int) -> MemberLauncher:
        parsed = OverridesParser.create().parse_overrides(task)
        fixed = {o.get_key_element() for o in parsed if not o.is_sweep_override()}
        holder["it"] = MemberLauncher(args, sweep_dir, fixed, width)
        return holder["it"]

    sweeper, task = compose_sweeper(args, name, sweep_dir, launcher_of)
    if args.dry_run:
        print(f"launcher: dry run, nothing started: hydra/sweeper={name} proposes each member from the results of "
              f"the ones before, so they cannot be listed ahead. Members would run here, one after another, into "
              f"{sweep_dir}/<index>-<key=value,…>/, over: {' '.join(task)}")
        return 0
    members = holder["it"]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    print(f"launcher: sweep by hydra/sweeper={name} in {sweep_dir}, one member after another; objective: "
          f"{members.objective}", flush=True)
    try:
        sweeper.sweep(arguments=task)
    except _Stop:
        pass
    except UsageError:
        raise
    except Exception as e:  # the sweeper's own rule, e.g. Optuna's max_failure_rate, ended it
        print(f"launcher: hydra/sweeper={name} stopped the sweep: {type(e).__name__}: {e}", flush=True)
        if not any(members.codes.values()):
            members.codes["sweeper"] = 1
    if members.members:
        record.write_summary(sweep_dir)
    for extra in sorted(sweep_dir.glob("*.yaml")):
        print(f"launcher: the sweeper wrote {extra}")
    return sweep.report(sweep_dir, members.codes, len(members.members))
