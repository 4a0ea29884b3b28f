"""docker/: the image and the compose file, on a real Docker engine (tests/dockerd.py), with real containers.

The image is built the way docker/README.md says to build it behind a TLS-intercepting proxy and with a
local torch wheel: FROM a Debian base made here with debootstrap (no registry is reachable), this machine's
CA certificates in EXTRA_CA_CERTS, the host's torch wheel in docker/wheels/ of a copy of the build context,
and WITH_HOROVOD=0 to keep it quick. Then docker-compose runs node0 and node1 (one CPU rank each, world
size 2) and the results land in the host's run directory through the bind mount, where they are compared
with the same 2-rank job run on the host without Docker.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import ROOT, launch, scalars
from dockerd import Engine, EngineUnavailable, docker_engine

pytestmark = [pytest.mark.slow, pytest.mark.docker]

BASE_IMAGE = "launcher-base:bookworm"  # scripts/docker_base.sh makes it
IMAGE = "launcher-test:latest"  # a fixed name: the next build reuses this one's layers
COMPOSE_FILE = ROOT / "docker" / "docker-compose.yml"
PROJECT_PREFIX = "launchertest"  # + the pytest's pid: compose project names
CA_DIR = Path("/usr/local/share/ca-certificates")  # the proxy's CA, as update-ca-certificates reads it
BUILD_TIMEOUT_S = 1800
RUN_TIMEOUT_S = 300

# trainer.threads=1: the same intra-op threads in a container (2 cores, 1 rank) as on the host (2 ranks)
SHORT = ["trainer.max_steps=40", "trainer.log_every=1", "trainer.eval_every=1000", "trainer.checkpoint_every=20",
         "trainer.threads=1"]
LONG = ["trainer.max_steps=1500", "trainer.log_every=10", "trainer.eval_every=100000",
        "trainer.checkpoint_every=300", "trainer.threads=1"]


# -- the engine and the image ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with contextlib.ExitStack() as stack:
        try:
            found = stack.enter_context(docker_engine())
            compose = found.compose  # checked here: without compose these tests cannot run either
        except EngineUnavailable as e:
            pytest.skip(f"no Docker engine here: {e}")
        print(f"docker engine at {found.host}; compose: {' '.join(compose)}")
        yield found


def torch_wheels() -> list[Path]:
    """Wheels of the host's exact torch in pip's find-links directories (this machine serves it locally)."""
    conf = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    dirs = os.environ.get("PIP_FIND_LINKS", "").split()
    dirs += [word for line in conf.splitlines() if ".find-links=" in line
             for word in line.split("=", 1)[1].strip("'\"").split()]
    version = torch.__version__
    return sorted({w for d in dirs if Path(d).is_dir() for w in Path(d).glob(f"torch-{version}-*.whl")})


def build_context(dest: Path) -> Path:
    """The repository's files (tracked and new, as git sees the work tree), plus the torch wheel(s) in
    docker/wheels/: the layout docker/README.md describes, without touching the work tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():  # listed but deleted in the work tree: not part of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    wheels = dest / "docker" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for wheel in torch_wheels():
        try:
            os.link(wheel, wheels / wheel.name)  # hundreds of MB: a hard link where the filesystem allows
        except OSError:
            shutil.copy2(wheel, wheels / wheel.name)
    return dest


def extra_ca_certs() -> str:
    return "".join(p.read_text() for p in sorted(CA_DIR.rglob("*.crt"))) if CA_DIR.is_dir() else ""


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    started = time.monotonic()
    base = subprocess.run(["bash", str(ROOT / "scripts" / "docker_base.sh"), BASE_IMAGE], env=engine.env,
                          capture_output=True, text=True, timeout=900)
    assert base.returncode == 0, f"scripts/docker_base.sh failed:\n{base.stdout[-3000:]}\n{base.stderr[-3000:]}"
    context = build_context(tmp_path_factory.mktemp("context"))
    wheels = sorted(p.name for p in (context / "docker" / "wheels").iterdir())
    env = {**engine.env, "IMAGE": IMAGE, "BASE_IMAGE": BASE_IMAGE, "WITH_HOROVOD": "0",
           # with the host's wheel the container trains with the very same torch as the host
           "TORCH_SOURCE": "wheels" if wheels else "auto", "EXTRA_CA_CERTS": extra_ca_certs()}
    log = context.parent / "build.log"
    # the copy's compose file: its build context (..) is the copy
    argv = [*engine.compose, "-p", "launcherbuild", "-f", str(context / "docker" / COMPOSE_FILE.name), "build", "node0"]
    with open(log, "w") as out:
        code = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S).returncode
    assert code == 0, f"image build failed (wheels: {wheels}); last lines of {log}:\n" + \
        "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    # earlier builds of the image (untagged now); not the build stage's cache, which has no such label
    engine.docker("image", "prune", "--force", "--filter", "label=org.opencontainers.image.title=launcher")
    print(f"base image and {IMAGE} ready in {time.monotonic() - started:.0f} s (torch wheels: {wheels})")
    return IMAGE


# -- one compose project per test ------------------------------------------------------------------
def finished_ns(stamp: str) -> int:
    """Docker's State.FinishedAt (RFC 3339, UTC, up to 9 fractional digits) -> ns since the epoch."""
    seconds, _, fraction = stamp.removesuffix("Z").partition(".")
    whole = datetime.datetime.fromisoformat(seconds).replace(tzinfo=datetime.timezone.utc).timestamp()
    return int(whole) * 10**9 + int(fraction.ljust(9, "0")[:9])


@dataclass
class Job:
    engine: Engine
    project: str
    runs: Path  # the host directory mounted at /runs
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        argv = [*self.engine.compose, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)

    def up(self) -> subprocess.CompletedProcess:
        """The job in the foreground until a node exits (then compose stops the other)."""
        done = self.compose("up", "--no-build", "--no-color", "--abort-on-container-exit")
        assert done.returncode == 0, self.describe(done)
        return done

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service).stdout

    def exits(self) -> dict[str, tuple[int, int]]:
        """{service: (exit code, when it exited)} of the project's containers (compose v1 and v2 label them
        alike); every one must have exited."""
        ids = self.engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}")
        fmt = '{{index .Config.Labels "com.docker.compose.service"}} {{.State.ExitCode}} {{.State.FinishedAt}} ' \
              '{{.State.Running}}'
        rows = [line.split() for line in self.engine.docker("inspect", "--format", fmt, *ids.stdout.split())
                .stdout.splitlines()]
        assert all(running == "false" for *_, running in rows), rows
        return {service: (int(code), finished_ns(finished)) for service, code, finished, _ in rows}

    def exit_codes(self) -> dict[str, int]:
        return {service: code for service, (code, _) in self.exits().items()}

    def assert_finished_cleanly(self) -> None:
        """Both nodes ended the job themselves, with exit status 0.

        One exception, from --abort-on-container-exit: the nodes leave torchrun's exit barrier together, and
        when the first container exits, compose sends SIGTERM to the other, which may get it in the last
        milliseconds of its exit, after its ranks are done; its launcher then reports 143. (The callers
        check that the job's results are complete.)"""
        exits = self.exits()
        first, last = sorted(exits, key=lambda service: exits[service][1])
        assert exits[first][0] == 0 and exits[last][0] in (0, 143), exits

    def container(self, service: str) -> str:
        ids = self.engine.docker("ps", "-q", "--filter", f"label=com.docker.compose.project={self.project}",
                                 "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def healthy_now(self, service: str) -> bool:
        """Run the service's healthcheck command in its container (the engine's schedule is too slow to wait for)."""
        container = self.container(service)
        test = json.loads(self.engine.docker("inspect", "--format", "{{json .Config.Healthcheck.Test}}",
                                             container).stdout)
        assert test[0] == "CMD", test
        return self.engine.docker("exec", container, *test[1:], check=False).returncode == 0

    def describe(self, done: subprocess.CompletedProcess) -> str:
        return (f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}\n"
                f"node1:\n{self.logs('node1')[-3000:]}")


def remove_dead_projects(engine: Engine) -> None:
    """Containers and networks of these tests' projects whose pytest was killed before its teardown."""
    def dead(project: str) -> bool:
        pid = project.removeprefix(PROJECT_PREFIX)
        return project.startswith(PROJECT_PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists()

    fmt = '{{.ID}} {{.Label "com.docker.compose.project"}}'
    for kind in ("container", "network"):
        rows = [line.split() for line in engine.docker(kind, "ls", "--all" if kind == "container" else "--no-trunc",
                                                       "--format", fmt).stdout.splitlines()]
        for ident in [row[0] for row in rows if len(row) == 2 and dead(row[1])]:
            engine.docker(kind, "rm", *(["--force", "--volumes"] if kind == "container" else []), ident)


@pytest.fixture
def job(engine: Engine, image: str, tmp_path: Path) -> Iterator[Job]:
    remove_dead_projects(engine)
    runs, data = tmp_path / "runs", tmp_path / "data"
    runs.mkdir()
    data.mkdir()
    runs.chmod(0o777)  # the containers' user is not root, and not this test's user
    project = f"{PROJECT_PREFIX}{os.getpid()}"
    env = {**engine.env, "IMAGE": image, "RUNS_DIR": str(runs), "DATA_DIR": str(data), "RUN_NAME": "run",
           "NODES": "2", "GPUS_PER_NODE": "1", "MASTER_PORT": "29500"}
    made = Job(engine, project, runs, env)
    yield made
    made.compose("down", "--remove-orphans", timeout=180)


# -- reading results -------------------------------------------------------------------------------
def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.json"))


def result(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "result.json").read_text())


def assert_same_training(run_dir: Path, reference: Path) -> None:
    got, expected = scalars(run_dir, "train/loss"), scalars(reference, "train/loss")
    assert [s for s, _ in got] == [s for s, _ in expected]
    # the same gradients all-reduced between two containers instead of two local processes
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]),
                               rtol=1e-4, atol=0)
    got, expected = result(run_dir), result(reference)
    assert got["step"] == expected["step"] and got["test/accuracy"] == expected["test/accuracy"]
    assert got["test/loss"] == pytest.approx(expected["test/loss"], rel=1e-4)


def tb_steps(events_file: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


# -- the tests -------------------------------------------------------------------------------------
def test_two_containers_train_like_two_local_ranks(job: Job, tmp_path: Path) -> None:
    job.env["TRAIN_ARGS"] = " ".join(SHORT)
    done = job.up()
    job.assert_finished_cleanly()
    for node in ("node0", "node1"):
        assert re.search(r"world size\s+2\n", job.logs(node)), job.logs(node)[-3000:]
    # rank 0's table of ranks: one rank on each container
    assert {m.group(1) for m in re.finditer(r"\[rank0\]:\d\s+0\s+(node\d)\s", done.stdout)} == {"node0", "node1"}
    run_dir = job.runs / "run"
    assert (run_dir / "checkpoints" / "step-00000040.pt").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert (run_dir / "result.json").stat().st_uid != 0  # written by the image's user, not root

    reference = tmp_path / "reference"
    launch(reference, *SHORT, gpus=2)
    assert_same_training(run_dir, reference)


def test_stop_checkpoints_and_up_resumes(job: Job, tmp_path: Path) -> None:
    job.env["TRAIN_ARGS"] = " ".join(LONG)
    run_dir = job.runs / "run"
    started = job.compose("up", "--no-build", "--no-color", "-d")
    assert started.returncode == 0, job.describe(started)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while len(list((run_dir / "attempts" / "0").glob("rank*.progress"))) < 2:  # the ranks started: rendezvous done
        assert time.monotonic() < deadline, job.logs("node0")[-3000:]
        time.sleep(0.2)
    assert job.healthy_now("node1") and job.healthy_now("node0")  # both reach the rendezvous on node0
    while not (run_dir / "checkpoints" / "step-00000300.json").exists():  # then stop, well before step 1500
        assert time.monotonic() < deadline, job.logs("node0")[-3000:]
        time.sleep(0.1)

    began = time.monotonic()
    stopped = job.compose("stop")
    took = time.monotonic() - began
    assert stopped.returncode == 0, job.describe(stopped)
    assert job.exit_codes() == {"node0": 143, "node1": 143}  # both launchers got SIGTERM through tini
    assert took < 30, f"stop took {took:.0f} s: something waited for a timeout or was killed"
    stop_step = checkpoint_steps(run_dir)[-1]
    assert 300 < stop_step < 1500
    assert f"stopping on request at step {stop_step}: checkpoint saved" in job.logs("node0")
    first_events = set((run_dir / "tb").glob("events.out.tfevents.*"))

    done = job.up()
    job.assert_finished_cleanly()
    assert f"resuming from step {stop_step} " in done.stdout
    (events,) = set((run_dir / "tb").glob("events.out.tfevents.*")) - first_events
    resumed = tb_steps(events, "train/loss")  # what the second run logged
    assert resumed[0] == stop_step + 10 and resumed[-1] == 1500
    assert [s for s, _ in scalars(run_dir, "train/loss")] == list(range(10, 1501, 10))  # no step twice

    reference = tmp_path / "reference"
    launch(reference, *LONG, gpus=2)
    assert_same_training(run_dir, reference)
