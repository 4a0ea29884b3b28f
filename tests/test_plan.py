"""Launch planning is a pure function: golden argv/env per backend, and the validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import parse_hostfile
from launcher.errors import UsageError
from launcher.plan.planner import DEFAULT_MASTER_PORT, plan_launch
from launcher.plan.types import LaunchOptions

RUN = Path("/runs/r1")
PY = "/opt/venv/bin/python3"  # no runner beside it: the argv names horovodrun/mpirun, found on PATH
FREE_PORT = 41000
TRAINER = ("-m", "workers.train", "--run-dir", str(RUN))


def plan(device_count: int = 0, cpu_count: int = 4, is_root: bool = False, env: dict[str, str] | None = None,
         **opts: object):  # noqa: ANN201
    return plan_launch(LaunchOptions(run_dir=RUN, **opts), device_count=device_count, free_port=FREE_PORT,
                       cpu_count=cpu_count, python=PY, env=env or {}, is_root=is_root)


def torchrun_argv(nnodes: int, nproc: int, node_rank: int, endpoint: str, program: tuple[str, ...],
                  local_addr: str | None = None) -> tuple:
    multi = ("--rdzv-conf", f"is_host={int(node_rank == 0)}") if nnodes > 1 else ()
    multi += ("--local-addr", local_addr) if local_addr else ()
    return (PY, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "launcher",
            "--max-restarts", "0", "--log-dir", "/runs/r1/logs", "--tee", "3", *multi, *program)


# -- torchrun -------------------------------------------------------------------------------------
def test_one_node_two_cpu_ranks_golden() -> None:
    p = plan(gpus=2)
    assert (p.backend, p.device, p.nnodes, p.nproc_per_node, p.world_size, p.node_rank) == ("torchrun", "cpu", 1,
                                                                                          2, 2, 0)
    assert (p.master_addr, p.master_port) == ("127.0.0.1", FREE_PORT)
    assert p.builtin
    [cmd] = p.commands
    assert cmd.argv == torchrun_argv(1, 2, 0, f"127.0.0.1:{FREE_PORT}", TRAINER)
    root = str(Path(__file__).resolve().parent.parent)
    assert dict(cmd.env) == {
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": root,  # `-m workers.train` works from any working directory
        "OMP_NUM_THREADS": "2",  # 4 cores / 2 ranks
        "LAUNCHER_RUN_DIR": str(RUN),
        "LAUNCHER_RESTART_BACKOFF_S": "1",  # workers/rank.py waits it out before a restarted attempt
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[rank${rank}]:",
    }


def test_second_node_of_two_golden() -> None:
    p = plan(device_count=8, gpus=8, nodes=2, node_rank=1, master_addr="10.0.0.1", cpu_count=64)
    assert (p.device, p.nnodes, p.world_size, p.node_rank) == ("cuda", 2, 16, 1)
    assert (p.master_addr, p.master_port) == ("10.0.0.1", DEFAULT_MASTER_PORT)
    [cmd] = p.commands
    assert cmd.argv == torchrun_argv(2, 8, 1, "10.0.0.1:29500", TRAINER)
    assert cmd.name == "node1"
    assert cmd.env["OMP_NUM_THREADS"] == "8"


@pytest.mark.parametrize(
    ("opts", "port"),
    [
        ({"nodes": 1}, FREE_PORT),  # one node: a free port, so two jobs on one box don't collide
        ({"nodes": 2, "node_rank": 0, "master_addr": "n0"}, DEFAULT_MASTER_PORT),  # every node must agree
        ({"nodes": 1, "master_port": 1234}, 1234),
        ({"nodes": 2, "node_rank": 0, "master_addr": "n0", "master_port": 1234}, 1234),
    ],
)
def test_master_port_free_only_on_one_node(opts: dict, port: int) -> None:
    p = plan(gpus=1, **opts)
    assert p.master_port == port
    assert p.commands[0].argv[p.commands[0].argv.index("--rdzv-endpoint") + 1].endswith(f":{port}")


def test_max_restarts_pass_through() -> None:
    argv = plan(gpus=1, max_restarts=3).commands[0].argv
    assert argv[argv.index("--max-restarts") + 1] == "3"


@pytest.mark.parametrize(("device_count", "gpus", "device", "nproc"),
                         [(0, None, "cpu", 1), (0, 3, "cpu", 3), (4, None, "cuda", 4), (4, 2, "cuda", 2)])
def test_device_and_default_ranks(device_count: int, gpus: int | None, device: str, nproc: int) -> None:
    p = plan(device_count=device_count, gpus=gpus)
    assert (p.device, p.nproc_per_node, p.world_size) == (device, nproc, nproc)


@pytest.mark.parametrize(
    "program",
    [("script.py", "--x", "1"), ("-m", "pkg.train", "--x"), ("dir/train.py",)],
    ids=["script", "module", "script-no-args"],
)
def test_script_and_module_mode(program: tuple[str, ...]) -> None:
    p = plan(gpus=2, program=program)
    # run as they are, in the rank's own process, under the module that reports to the launcher
    assert p.commands[0].argv == torchrun_argv(1, 2, 0, f"127.0.0.1:{FREE_PORT}", ("-m", "workers.rank", *program))
    assert not p.builtin


def test_plan_reads_only_the_env_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "13")
    monkeypatch.setenv("PYTHONPATH", "/from/os/environ")
    env = plan(gpus=2).commands[0].env
    assert env["OMP_NUM_THREADS"] == "2" and "/from/os/environ" not in env["PYTHONPATH"]
    env = plan(gpus=2, env={"OMP_NUM_THREADS": "7", "PYTHONPATH": "/given"}).commands[0].env
    assert env["OMP_NUM_THREADS"] == "7" and env["PYTHONPATH"].endswith(":/given")


@pytest.mark.parametrize(
    ("opts", "device_count", "message"),
    [
        ({"gpus": 0}, 0, "--gpus 0"),
        ({"gpus": -1}, 0, "--gpus -1"),
        ({"gpus": 4}, 2, "this machine has 2 CUDA device(s)"),
        ({"nodes": 2}, 0, "needs --node-rank and --master-addr"),
        ({"nodes": 2, "node_rank": 0}, 0, "needs --node-rank and --master-addr"),
        ({"nodes": 2, "master_addr": "n0"}, 0, "needs --node-rank and --master-addr"),
        ({"nodes": 2, "node_rank": 2, "master_addr": "n0"}, 0, "--node-rank 2 is outside 0..1"),
        ({"nodes": 2, "node_rank": -1, "master_addr": "n0"}, 0, "--node-rank -1 is outside 0..1"),
        ({"node_rank": 1}, 0, "--node-rank 1 is outside 0..0"),
        ({"nodes": 0}, 0, "--nodes 0"),
        ({"max_restarts": -1}, 0, "--max-restarts -1"),
        ({"program": ("run.sh",)}, 0, "is not a Python script"),
        ({"backend": "nope"}, 0, "unknown backend 'nope'"),
        ({"hosts": ("a:x",)}, 0, "bad host 'a:x'"),
        ({"hosts": ("a:0",)}, 0, "bad host 'a:0'"),
    ],
)
def test_bad_options_are_usage_errors(opts: dict, device_count: int, message: str) -> None:
    with pytest.raises(UsageError) as e:
        plan(device_count=device_count, **opts)
    assert message in str(e.value)
    assert "\n" not in str(e.value)  # the CLI prints it as one line


def test_dash_m_without_a_module_is_a_usage_error() -> None:
    """`python -m launcher -- -m` (module name forgotten) must be exit 2, not a traceback.

    BUG: LaunchPlan.rank_marker indexes program[1] and raises IndexError (launcher/plan/planner.py, rank_marker)."""
    with pytest.raises(UsageError, match="-m"):
        plan(gpus=2, program=("-m",))


# -- ssh fan-out ----------------------------------------------------------------------------------
def test_torchrun_fan_out_golden() -> None:
    """--hosts with torchrun: one ssh command per host, each running torchrun under the node agent."""
    import shlex

    p = plan(gpus=2, hosts=("node1", "node2:4"), workdir=Path("/home/me/proj"), ssh_config=Path("/etc/ssh/cfg"),
             env={"NCCL_DEBUG": "INFO", "HOME": "/root", "LAUNCHER_TEST_X": "1"})
    assert (p.nnodes, p.world_size, p.master_addr, p.master_port) == (2, 6, "node1", DEFAULT_MASTER_PORT)
    assert [c.name for c in p.commands] == ["node1", "node2"]
    for i, (cmd, host, nproc) in enumerate(zip(p.commands, ("node1", "node2"), (2, 4), strict=True)):
        assert cmd.remote and cmd.rank_marker == "workers.train" and dict(cmd.env) == {}
        assert cmd.argv[:-1] == ("ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                                 "-o", "ServerAliveCountMax=6", "-F", "/etc/ssh/cfg", host)
        cd, _, rest = cmd.argv[-1].partition(" && exec ")
        assert cd == "cd /home/me/proj"
        words = shlex.split(rest)  # what the remote shell will run, word by word
        assert words[0] == "env" and "NCCL_DEBUG=INFO" in words and "LAUNCHER_TEST_X=1" in words
        assert "HOME=/root" not in words  # only the launcher's NCCL_*/GLOO_*/TORCH*/… variables travel
        agent = words.index(PY)
        assert words[agent:agent + 6] == [PY, "-m", "launcher.supervise.node", "--marker", "workers.train", "--"]
        assert tuple(words[agent + 6:]) == torchrun_argv(2, nproc, i, "node1:29500", TRAINER, local_addr=host)


def test_fan_out_quotes_hostile_words() -> None:
    """A run dir or variable with shell metacharacters reaches the remote side as one word, never run."""
    import shlex

    run = Path("/runs/a b;touch pwned")
    p = plan_launch(LaunchOptions(run_dir=run, gpus=1, hosts=("h1", "h2")), device_count=0, free_port=FREE_PORT,
                    cpu_count=4, python=PY, env={"NCCL_X": "$(touch pwned)"})
    words = shlex.split(p.commands[0].argv[-1].partition(" && exec ")[2])
    assert "NCCL_X=$(touch pwned)" in words and str(run) in words


def test_mpi_across_hosts_exports_env_and_master() -> None:
    p = plan(backend="mpi", gpus=2, hosts=("n1", "n2"), ssh_config=Path("/c"), env={"GLOO_SOCKET_IFNAME": "eth1"})
    argv = p.commands[0].argv
    assert argv[:5] == ("mpirun", "-np", "4", "-H", "n1:2,n2:2")
    assert argv[argv.index("plm_rsh_args") + 1] == "-o BatchMode=yes -o ConnectTimeout=10 -F /c"
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert "GLOO_SOCKET_IFNAME=eth1" in exported and "MASTER_ADDR=n1" in exported


# -- horovodrun -----------------------------------------------------------------------------------
def test_horovod_local_golden() -> None:
    p = plan(backend="horovod", gpus=2)
    [cmd] = p.commands
    assert cmd.argv == ("horovodrun", "-np", "2", "-H", "localhost:2", "--gloo", "--output-filename",
                        "/runs/r1/logs/horovod/attempt_0", PY, *TRAINER, "--comm", "horovod")
    assert cmd.env["OMP_NUM_THREADS"] == "2"


def test_horovod_two_hosts_of_eight() -> None:
    p = plan(backend="horovod", gpus=8, hosts=("node1", "node2"), cpu_count=64)
    assert (p.nnodes, p.world_size) == (2, 16)
    # horovodrun's bare `ssh` finds the launcher's wrapper first on PATH (--ssh-config, BatchMode, ...)
    wrapper = ("sh", "-c", 'PATH="$0:$PATH" exec "$@"', "/runs/r1/horovod_ssh")
    assert p.commands[0].argv == (*wrapper, "horovodrun", "-np", "16", "-H", "node1:8,node2:8", "--gloo",
                                  "--output-filename", "/runs/r1/logs/horovod/attempt_0", PY, *TRAINER, "--comm",
                                  "horovod")


def test_horovod_hosts_controller_and_tuning() -> None:
    p = plan(backend="horovod", gpus=8, hosts=("node1", "node2:4"), controller="mpi", network_interface="eth0",
             timeline="/tmp/tl.json", fusion_threshold_mb=32, cycle_time_ms=2.5)
    argv = p.commands[0].argv
    assert argv[4:10] == ("horovodrun", "-np", "12", "-H", "node1:8,node2:4", "--mpi")
    for flag, value in [("--timeline-filename", "/tmp/tl.json"), ("--fusion-threshold-mb", "32"),
                        ("--cycle-time-ms", "2.5"), ("--network-interface", "eth0")]:
        assert argv[argv.index(flag) + 1] == value
    assert argv.index("--network-interface") < argv.index(PY)  # launcher options, not the program's
    assert p.nnodes == 2 and p.world_size == 12


def test_horovod_tuning_absent_unless_asked() -> None:
    argv = plan(backend="horovod", gpus=2).commands[0].argv
    assert not {"--timeline-filename", "--fusion-threshold-mb", "--cycle-time-ms", "--network-interface"} & set(argv)


def test_horovod_nodes_disagreeing_with_hosts() -> None:
    with pytest.raises(UsageError, match="--nodes 3 but 2 hosts"):
        plan(backend="horovod", gpus=2, nodes=3, hosts=("a", "b"))


def test_horovod_script_runs_without_comm_flag() -> None:
    cmd = plan(backend="horovod", gpus=2, program=("hvd.py", "--x")).commands[0]
    # --horovod: torchrun's variables from horovodrun's, so a torchrun script runs too
    assert cmd.argv[-6:] == (PY, "-m", "workers.rank", "--horovod", "hvd.py", "--x")
    assert cmd.env["MASTER_ADDR"] == "127.0.0.1" and cmd.env["MASTER_PORT"].isdigit()


# -- mpirun ---------------------------------------------------------------------------------------
def test_mpirun_flags_only_where_needed() -> None:
    plain = plan(backend="mpi", gpus=2, cpu_count=4).commands[0].argv
    assert plain[:5] == ("mpirun", "-np", "2", "-H", "localhost:2")
    assert "--allow-run-as-root" not in plain and "--oversubscribe" not in plain
    assert plain[plain.index("--bind-to") : plain.index("--bind-to") + 2] == ("--bind-to", "none")
    assert "OMP_NUM_THREADS=2" in plain and plain[plain.index("OMP_NUM_THREADS=2") - 1] == "-x"
    assert plain[-8:] == (PY, "-m", "workers.rank", "--mpi", *TRAINER)
    crowded = plan(backend="mpi", gpus=4, cpu_count=2, is_root=True).commands[0].argv
    assert "--allow-run-as-root" in crowded and "--oversubscribe" in crowded


# -- hostfiles ------------------------------------------------------------------------------------
def test_hostfile_formats(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("# cluster\nnode1 slots=8\nnode2:4\n\n   \nnode3  # default slots\nnode4 slots=2 # comment\n")
    assert parse_hostfile(f) == ["node1:8", "node2:4", "node3", "node4:2"]


@pytest.mark.parametrize("line", ["node1 slots=x", "node1 cpus=4", "a b c", "node1 slots=", "node1 slots=2 extra"])
def test_hostfile_bad_line_names_line_number(tmp_path: Path, line: str) -> None:
    f = tmp_path / "hosts"
    f.write_text(f"node0 slots=2\n{line}\n")
    with pytest.raises(UsageError, match=f"{f}:2: bad hostfile line"):
        parse_hostfile(f)


@pytest.mark.parametrize("line", ["node1:x", "node1:", "node1 slots=0", "node1:0"])
def test_hostfile_bad_slots_name_line_number(tmp_path: Path, line: str) -> None:
    """A bad slot count is a bad hostfile line too, and the error should say which line.

    BUG: parse_hostfile's one-token branch accepts any single word (operator precedence: `A and B and C or
    len(parts) == 1`), and 'slots=0' passes `isdigit()`; the error only comes later from plan.parse_host
    as "bad host 'node1:x'", without the file or line number."""
    f = tmp_path / "hosts"
    f.write_text(f"node0 slots=2\n{line}\n")
    with pytest.raises(UsageError, match=f"{f}:2: bad hostfile line"):
        parse_hostfile(f)


def test_empty_hostfile(tmp_path: Path) -> None:
    f = tmp_path / "hosts"
    f.write_text("# nothing\n\n")
    with pytest.raises(UsageError, match="lists no hosts"):
        parse_hostfile(f)


def test_missing_hostfile(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        parse_hostfile(tmp_path / "nope")


# -- one job across nodes -------------------------------------------------------------------------
def test_nodes_started_seconds_apart_agree_on_the_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's multi-node command, typed on each node (no --name, no --run-dir), must form one job.

    BUG: the torchrun backend passes `--rdzv-id <run dir name>` (launcher/backends/torchrun.py) and the default
    run dir name is a per-node timestamp (launcher/cli.py options_from_args): nodes started in different
    seconds use different rendezvous ids on the same c10d store and wait for each other forever."""
    from launcher.cli import build_parser, options_from_args

    argv = ["--nodes", "2", "--gpus", "8", "--master-addr", "10.0.0.1"]
    endpoints = []
    for node_rank, stamp in ((0, "20250101-000000"), (1, "20250101-000007")):
        monkeypatch.setattr("launcher.cli.time.strftime", lambda _fmt, s=stamp: s)
        args = build_parser().parse_intermixed_args([*argv, "--node-rank", str(node_rank)])
        p = plan_launch(options_from_args(args, [], {}), device_count=8, free_port=FREE_PORT, cpu_count=64,
                        python=PY, env={})
        a = p.commands[0].argv
        endpoints.append((a[a.index("--rdzv-endpoint") + 1], a[a.index("--rdzv-id") + 1]))
    assert endpoints[0] == endpoints[1]


def test_elastic_nodes_become_torchruns_min_max() -> None:
    p = plan(gpus=2, hosts=("a", "b"), min_nodes=1, nodes=2)
    assert p.elastic and (p.min_nodes, p.nnodes, p.world_size) == (1, 2, 4)
    argv = p.commands[0].argv[-1]  # the remote command ssh runs on host a
    assert "--nnodes 1:2" in argv and "is_host=1,last_call_timeout=10" in argv
    assert "--max-restarts 3" in argv  # losing a node is a restart of the others: some must be allowed
    assert not plan(gpus=2, hosts=("a", "b")).elastic


@pytest.mark.parametrize(("opts", "message"), [
    ({"backend": "mpi", "hosts": ("a", "b"), "min_nodes": 1, "nodes": 2}, "needs the torchrun backend"),
    ({"hosts": ("a", "b"), "min_nodes": 3, "nodes": 2}, "MIN must not exceed MAX"),
])
def test_elastic_refusals(opts: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        plan(gpus=2, **opts)


@pytest.mark.parametrize(("text", "nodes"), [("2", (2, 2)), ("1:4", (1, 4))])
def test_nodes_flag_takes_n_or_min_max(text: str, nodes: tuple[int, int]) -> None:
    from launcher.cli import build_parser

    args = build_parser().parse_args(["--nodes", text])
    assert (args.nodes if isinstance(args.nodes, tuple) else (args.nodes, args.nodes)) == nodes


def test_hostfile_gpus_pin_each_hosts_devices(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("a slots=2 gpus=0,2\nb slots=1\n")
    assert parse_hostfile(path) == ["a:2@0,2", "b:1"]
    p = plan(gpus=2, hosts=tuple(parse_hostfile(path)))
    assert p.hosts == (("a", 2), ("b", 1)) and p.world_size == 3
    assert p.env["LAUNCHER_DEVICES"] == "a=0,2"  # workers/rank.py sets CUDA_VISIBLE_DEVICES from it
    with pytest.raises(UsageError, match="one GPU per rank"):
        plan(gpus=2, hosts=("a:3@0,2",))
    path.write_text("a slots=2 gpus=x\n")
    with pytest.raises(UsageError, match="bad gpus="):
        parse_hostfile(path)


def test_a_rank_pins_its_hosts_gpus() -> None:
    from workers.rank import pin_devices

    env = {"LAUNCHER_DEVICES": "a=0,2;b=1", "LAUNCHER_HOST": "b"}
    pin_devices(env)  # type: ignore[arg-type]
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    env = {"LAUNCHER_DEVICES": "nowhere.invalid=5;127.0.0.1=4"}  # no LAUNCHER_HOST: the address this host owns
    pin_devices(env)  # type: ignore[arg-type]
    assert env["CUDA_VISIBLE_DEVICES"] == "4"


@pytest.mark.parametrize(
    ("per_node", "expected"),
    [
        ([8] * 1000, "8 ranks on each of 1000 nodes"),
        ([8] * 998 + [4, 4], "8 ranks on each of 998 nodes, 4 on 2"),
        ([1], "1 rank on 1 node"),
        ([4, 8, 8], "8 ranks on each of 2 nodes, 4 on 1"),
        ([8] * 5 + [4] * 3 + [2] * 2 + [1, 3], "8 ranks on each of 5 nodes, 4 on 3, 2 on 2, other counts on 2 more"),
    ],
)
def test_plan_summary_folds_equal_rank_counts(per_node: list[int], expected: str) -> None:
    from launcher.supervise.job import rank_layout

    assert rank_layout(per_node) == expected
