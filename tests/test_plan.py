"""Launch planning is a pure function: golden argv/env per backend, and the validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import parse_hostfile
from launcher.errors import UsageError
from launcher.plan import LaunchOptions, plan_launch

RUN = Path("/runs/r1")
PY = "/usr/bin/python3"
TRAINER = ("-m", "workers.train", "--run-dir", str(RUN))


def plan(device_count: int = 0, cpu_count: int = 4, is_root: bool = False, **opts: object):  # noqa: ANN201
    return plan_launch(LaunchOptions(run_dir=RUN, **opts), device_count=device_count, free_port=41000,
                       cpu_count=cpu_count, python=PY, env={}, is_root=is_root)


def torchrun_argv(nnodes: int, nproc: int, node_rank: int, endpoint: str, program: tuple[str, ...]) -> tuple:
    return (PY, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", "r1", "--max-restarts", "0", "--log-dir", "/runs/r1/logs", "--tee", "3", *program)


def test_one_node_two_cpu_ranks() -> None:
    p = plan(gpus=2)
    assert (p.device, p.world_size, p.master_addr, p.master_port) == ("cpu", 2, "127.0.0.1", 41000)
    [cmd] = p.commands
    assert cmd.argv == torchrun_argv(1, 2, 0, "127.0.0.1:41000", TRAINER)
    assert cmd.env["OMP_NUM_THREADS"] == "2"  # 4 cores / 2 ranks
    assert cmd.env["PYTHONUNBUFFERED"] == "1"
    assert cmd.env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] == "[rank${rank}]:"


def test_second_node_of_two() -> None:
    p = plan(device_count=8, gpus=8, nodes=2, node_rank=1, master_addr="10.0.0.1")
    assert (p.device, p.world_size, p.node_rank, p.master_port) == ("cuda", 16, 1, 29500)  # no random port
    assert p.commands[0].argv == torchrun_argv(2, 8, 1, "10.0.0.1:29500", TRAINER)
    assert p.commands[0].name == "node1"


def test_explicit_master_port_and_restarts() -> None:
    argv = plan(gpus=1, master_port=1234, max_restarts=3).commands[0].argv
    assert "127.0.0.1:1234" in argv and argv[argv.index("--max-restarts") + 1] == "3"


def test_gpus_default_to_device_count() -> None:
    assert plan(device_count=4).nproc_per_node == 4
    assert plan(device_count=0).nproc_per_node == 1


@pytest.mark.parametrize("program", [("train.py", "--lr", "0.1"), ("-m", "pkg.train", "--x")])
def test_script_and_module_mode(program: tuple[str, ...]) -> None:
    p = plan(gpus=2, program=program)
    assert p.commands[0].argv == torchrun_argv(1, 2, 0, "127.0.0.1:41000", program)
    assert not p.builtin


@pytest.mark.parametrize(
    ("opts", "device_count", "message"),
    [
        ({"gpus": 0}, 0, "--gpus 0"),
        ({"gpus": 4}, 2, "this machine has 2 CUDA device(s)"),
        ({"nodes": 2}, 0, "needs --node-rank and --master-addr"),
        ({"nodes": 2, "node_rank": 2, "master_addr": "n0"}, 0, "--node-rank 2 is outside 0..1"),
        ({"nodes": 0}, 0, "--nodes 0"),
        ({"max_restarts": -1}, 0, "--max-restarts -1"),
        ({"program": ("run.sh",)}, 0, "is not a Python script"),
        ({"backend": "nope"}, 0, "unknown backend 'nope'"),
        ({"hosts": ("a:x",)}, 0, "bad host 'a:x'"),
        ({"hosts": ("a", "b")}, 0, "not supported yet"),  # torchrun ssh fan-out: issue 5
    ],
)
def test_bad_options_are_usage_errors(opts: dict, device_count: int, message: str) -> None:
    with pytest.raises(UsageError, match=None) as e:
        plan(device_count=device_count, **opts)
    assert message in str(e.value)


def test_horovod_local() -> None:
    cmd = plan(backend="horovod", gpus=2).commands[0]
    assert cmd.argv == ("horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "--output-filename",
                        "/runs/r1/logs/horovod", PY, *TRAINER, "--comm", "horovod")


def test_horovod_hosts_controller_and_tuning() -> None:
    p = plan(backend="horovod", gpus=8, hosts=("node1", "node2:4"), controller="mpi", network_interface="eth0",
             timeline="/tmp/tl.json", fusion_threshold_mb=32, cycle_time_ms=2.5)
    argv = p.commands[0].argv
    assert argv[:6] == ("horovodrun", "-np", "12", "-H", "node1:8,node2:4", "--mpi")
    for flag, value in [("--timeline-filename", "/tmp/tl.json"), ("--fusion-threshold-mb", "32"),
                        ("--cycle-time-ms", "2.5"), ("--network-interface", "eth0")]:
        assert argv[argv.index(flag) + 1] == value
    assert p.nnodes == 2 and p.world_size == 12


def test_horovod_script_runs_without_comm_flag() -> None:
    argv = plan(backend="horovod", gpus=2, program=("hvd.py", "--x")).commands[0].argv
    assert argv[-3:] == (PY, "hvd.py", "--x")


def test_mpirun_flags_only_where_needed() -> None:
    plain = plan(backend="mpi", gpus=2, cpu_count=4).commands[0].argv
    assert plain[:5] == ("mpirun", "-np", "2", "-H", "localhost:2")
    assert "--allow-run-as-root" not in plain and "--oversubscribe" not in plain
    assert plain[plain.index("--bind-to") : plain.index("--bind-to") + 2] == ("--bind-to", "none")
    assert "OMP_NUM_THREADS=2" in plain and plain[plain.index("OMP_NUM_THREADS=2") - 1] == "-x"
    assert plain[-7:] == (PY, "-m", "workers.mpi_env", *TRAINER)
    crowded = plan(backend="mpi", gpus=4, cpu_count=2, is_root=True).commands[0].argv
    assert "--allow-run-as-root" in crowded and "--oversubscribe" in crowded


def test_hostfile_formats(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("# cluster\nnode1 slots=8\nnode2:4\n\nnode3  # default slots\n")
    assert parse_hostfile(f) == ["node1:8", "node2:4", "node3"]


@pytest.mark.parametrize("line", ["node1 slots=x", "node1 cpus=4", "a b c"])
def test_hostfile_bad_line_names_line_number(tmp_path: Path, line: str) -> None:
    f = tmp_path / "hosts"
    f.write_text(f"node0 slots=2\n{line}\n")
    with pytest.raises(UsageError, match=f"{f}:2: bad hostfile line"):
        parse_hostfile(f)


def test_missing_hostfile(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        parse_hostfile(tmp_path / "nope")
