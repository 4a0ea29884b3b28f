"""Pre-flight (launcher/preflight/: checks.py, probe.py): the verdict on hand-made probe results; the real probe
on this machine; two network-namespace hosts, one behind a throttled link (tc)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, finish, run_launcher
from netns_hosts import IFNAME, Hosts, two_hosts, why_not

from launcher.cli import main as cli_main
from launcher.preflight.checks import judge, link_reference, rows, slow_ones, table
from launcher.preflight.gather import Host, Target, gather, probe_argv


def probe(**changes: Any) -> dict[str, Any]:
    """A healthy CPU host's report, as launcher.preflight.probe prints it."""
    return {"hostname": "h", "python": "3.11.7", "torch": "2.3.0", "cuda": False, "gpus": 0, "gpu_names": [],
            "nccl": None, "gloo": True, "ecc_errors": None, "xids": None, "port": None, "port_free": None,
            "free_port": 40000, "local_backend": "gloo", "local_ranks": 2, "local_gbps": 1.0, "local_error": None,
            "loopback_gbps": None, **changes}


def gpu_probe(gpus: int = 8, **changes: Any) -> dict[str, Any]:
    return probe(**{"cuda": True, "gpus": gpus, "nccl": "2.21.5", "local_backend": "nccl", "local_gbps": 150.0,
                    **changes})


def labels(problems: list, host: str) -> list[str]:
    return [p.label for p in problems if p.host == host]


# -- the verdict (quick) ----------------------------------------------------------------------------
def test_healthy_hosts_pass() -> None:
    hosts = [Host("a", probe=probe(port=29500, port_free=True, loopback_gbps=1.1)),
             Host("b", probe=probe(), link_gbps=0.9)]
    assert judge(hosts) == []
    assert [r["verdict"] for r in rows(hosts, [])] == ["ok", "ok"]


def test_version_mismatch_names_the_odd_host_and_both_versions() -> None:
    hosts = [Host("a", probe=probe()), Host("b", probe=probe(torch="2.1.0")), Host("c", probe=probe())]
    found = judge(hosts)
    assert [(p.host, p.label) for p in found] == [("b", "torch 2.1.0")]
    assert "b runs torch 2.1.0; a, c run torch 2.3.0" in found[0].line and "HINT" in found[0].line


def test_version_tie_of_two_hosts_takes_the_first_as_reference() -> None:
    found = judge([Host("a", probe=probe(python="3.10.12")), Host("b", probe=probe(python="3.11.7"))])
    assert [(p.host, p.label) for p in found] == [("b", "Python 3.11.7")]


def test_nccl_versions_must_match_on_gpu_hosts() -> None:
    found = judge([Host(n, probe=gpu_probe()) for n in "ab"] + [Host("c", probe=gpu_probe(nccl="2.18.1"))])
    assert [(p.host, p.label) for p in found] == [("c", "NCCL 2.18.1")]


def test_slow_local_host_is_named() -> None:
    hosts = [Host("a", probe=probe(local_gbps=1.0)), Host("b", probe=probe(local_gbps=1.2)),
             Host("c", probe=probe(local_gbps=0.45))]
    found = judge(hosts)
    assert [(p.host, p.label) for p in found] == [("c", "slow local")]
    assert "0.45 GB/s" in found[0].line and "median 1.1 GB/s" in found[0].line


def test_slow_means_at_most_half_the_median_of_the_others() -> None:
    assert slow_ones({"a": 1.0, "b": 0.5}) == {"b": 1.0}  # two hosts: the other one is the median
    assert slow_ones({"a": 1.0, "b": 0.51}) == {}
    assert slow_ones({"a": 1.0}) == {}  # nothing to compare with
    assert slow_ones({"a": 1.0, "b": 1.0, "c": 0.1, "d": 0.1}) == {"c": 1.0, "d": 1.0}


def test_slow_link_against_the_other_links() -> None:
    hosts = [Host("a", probe=probe()), Host("b", probe=probe(), link_gbps=1.0),
             Host("c", probe=probe(), link_gbps=0.3), Host("d", probe=probe(), link_gbps=1.1)]
    found = judge(hosts)
    assert [(p.host, p.label) for p in found] == [("c", "slow link")]
    assert "link to a 0.3 GB/s, at most 0.5x the other links' median (1.05 GB/s)" in found[0].line


def test_a_lone_link_is_slow_at_a_tenth_of_the_first_hosts_loopback() -> None:
    slow = [Host("a", probe=probe(loopback_gbps=4.0)), Host("b", probe=probe(), link_gbps=0.11)]  # 1 Gb/s
    found = judge(slow)
    assert [(p.host, p.label) for p in found] == [("b", "slow link")]
    assert "link to a 0.11 GB/s, at most 0.1x gloo over a's loopback (4 GB/s)" in found[0].line
    assert link_reference(slow) == ({"b": 0.11}, {"b": 4.0}, 0.1)
    ten_gbe = [Host("a", probe=probe(loopback_gbps=4.0)), Host("b", probe=probe(), link_gbps=1.1)]
    assert judge(ten_gbe) == []  # loopback is no network: a healthy 10 GbE link is a quarter of it


def test_port_busy_on_the_first_host() -> None:
    found = judge([Host("a", probe=probe(port=29500, port_free=False)), Host("b", probe=probe())])
    assert [(p.host, p.label) for p in found] == [("a", "port 29500 busy")]
    assert "--master-port" in found[0].line
    assert rows([Host("a", probe=probe(port=29500, port_free=False))], found)[0]["port"] == "busy"


def test_gpu_missing_too_few_gpus_ecc_and_xid() -> None:
    hosts = [Host("a", 8, probe=gpu_probe()), Host("b", 8, probe=probe()), Host("c", 8, probe=gpu_probe(gpus=4)),
             Host("d", 8, probe=gpu_probe(ecc_errors=3, xids=[13, 79]))]
    found = judge(hosts)
    assert labels(found, "a") == []
    assert labels(found, "b") == ["no GPU"] and "a, c, d do" in found[0].line
    assert labels(found, "c") == ["4 GPUs"]
    assert labels(found, "d") == ["ECC errors", "XID 79"]  # 13 is an application's fault, not the GPU's


def test_unreachable_host_and_failed_probe() -> None:
    found = judge([Host("a", probe=probe()), Host("b", reachable="no", error="Connection refused"),
                   Host("c", error="No module named torch")])
    assert [(p.host, p.label) for p in found] == [("b", "unreachable"), ("c", "probe failed")]
    assert "`ssh b true`" in found[0].line and "No module named torch" in found[1].line


def test_failed_link_is_named() -> None:
    found = judge([Host("a", probe=probe()), Host("b", probe=probe(), link_error="Connection reset by peer")])
    assert [(p.host, p.label) for p in found] == [("b", "no link")] and "GLOO_SOCKET_IFNAME" in found[0].line


def test_table_has_one_row_per_host() -> None:
    hosts = [Host("node1", reachable="yes", probe=gpu_probe(port=29500, port_free=True)),
             Host("n2", reachable="no", error="timeout")]
    text = table(rows(hosts, judge(hosts)))
    head, first, second = text.splitlines()
    assert head.split() == ["host", "reachable", "python", "torch", "backend", "gpus", "port", "local", "GB/s",
                            "link", "GB/s", "verdict"]
    assert first.split() == ["node1", "yes", "3.11.7", "2.3.0", "nccl", "2.21.5", "8", "free", "150", "-", "ok"]
    assert second.split()[:2] == ["n2", "no"] and second.endswith("unreachable")


def test_remote_probe_runs_in_the_working_directory_with_the_forwarded_env(tmp_path: Path) -> None:
    target = Target(hosts=(("node1", 2),), port=None, python="/opt/py bin/python", workdir=tmp_path / "my dir",
                    env={"GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": "/src"}, ssh_config=tmp_path / "cfg",
                    ssh_timeout=3)
    argv = probe_argv(target, "node1", ["--mb", "2"])
    assert argv[:argv.index("node1")] == ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-o",
                                          "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6", "-F",
                                          str(tmp_path / "cfg")]
    remote = shlex.split(argv[-1])
    assert remote[:4] == ["cd", str(tmp_path / "my dir"), "&&", "exec"]
    assert remote[4:] == ["env", "GLOO_SOCKET_IFNAME=eth0", "PYTHONPATH=/src", "/opt/py bin/python", "-m",
                          "launcher.preflight.probe", "--mb", "2"]
    assert probe_argv(target, "localhost", ["--mb", "2"]) == ["/opt/py bin/python", "-m",
                                                                 "launcher.preflight.probe", "--mb", "2"]


FAKE_PROBE = """#!{python}
import json, sys
args = sys.argv[3:]  # after "-m launcher.preflight.probe"
if {fail!r}:
    sys.exit("ModuleNotFoundError: No module named 'torch'")
print("a login banner")  # not JSON: skipped
report = {report!r}
report.update(port=29500 if "--port" in args else None, port_free=True if "--port" in args else None,
              loopback_gbps=1.0 if "--loopback" in args else None)
print(json.dumps(report), flush=True)
for line in sys.stdin:  # allreduce RANK ADDR PORT
    print(json.dumps({{"gbps": 0.001, "free_port": 40001}}), flush=True)
"""


def fake_python(path: Path, fail: bool = False) -> str:
    """An "interpreter" that answers ``-m launcher.preflight.probe`` like the probe does, without torch: 1 MB/s."""
    path.write_text(FAKE_PROBE.format(python=sys.executable, fail=fail, report=probe()))
    path.chmod(0o755)
    return str(path)


def test_gather_reads_reports_and_measures_links_through_the_running_probes(tmp_path: Path) -> None:
    target = Target(hosts=(("localhost", 2), ("127.0.0.1", 2)), port=29500, python=fake_python(tmp_path / "py"),
                    workdir=tmp_path, env={})
    hosts = gather(target, os.environ)
    assert [h.reachable for h in hosts] == ["local", "local"] and all(h.probe for h in hosts)
    assert hosts[0].probe["port_free"] and hosts[1].probe["port"] is None  # the port: on the first host only
    assert hosts[1].link_gbps == 0.001 and hosts[0].link_gbps is None
    assert [(p.host, p.label) for p in judge(hosts)] == [("127.0.0.1", "slow link")]  # vs 1.0 GB/s loopback


def test_a_probe_that_fails_is_named_with_its_error(tmp_path: Path) -> None:
    target = Target(hosts=(("localhost", 2),), port=None, python=fake_python(tmp_path / "py", fail=True),
                    workdir=tmp_path, env={}, local=True)
    [host] = gather(target, os.environ)
    assert host.probe is None and host.error == "ModuleNotFoundError: No module named 'torch'"
    assert [p.label for p in judge([host])] == ["probe failed"]


def test_preflight_usage_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["preflight", "--bogus"]) == 2
    assert cli_main(["preflight", "--hostfile", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "launcher: error: unrecognized arguments: --bogus. HINT: python -m launcher preflight --help"
    assert err[1].startswith("launcher: error: hostfile") and len(err) == 2


# -- the real probe on this machine (slow: torch imports, all-reduces) -----------------------------
@pytest.mark.slow
def test_preflight_of_this_machine_prints_a_table() -> None:
    proc = run_launcher(["preflight"], timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    head, row = proc.stdout.splitlines()[1:3]
    assert head.startswith("host") and row.split()[:2] == [socket.gethostname(), "local"] and row.endswith("ok")
    assert float(row.split()[7]) > 0  # the local all-reduce's GB/s


@pytest.mark.slow
def test_launch_with_preflight_refuses_when_the_rendezvous_port_is_busy(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_launcher(["--preflight", "--gpus", "2", "--run-dir", str(tmp_path / "run"), "--nodes", "2",
                             "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(port)],
                            timeout=240)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"rendezvous port {port} is in use" in proc.stderr and "not starting" in proc.stderr
    assert "launcher: starting" not in proc.stdout and not (tmp_path / "run" / "plan.json").exists()
    record = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert not record["ok"] and record["table"][0]["port"] == "busy"


@pytest.mark.slow
def test_launch_with_preflight_trains_when_all_is_well(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_launcher(["--preflight", "--gpus", "2", "--run-dir", str(run_dir), "trainer.max_steps=5",
                         "trainer.eval_every=1000", "trainer.checkpoint_every=1000"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.index("launcher: preflight of 1 host(s)") < proc.stdout.index("launcher: starting")
    assert json.loads((run_dir / "preflight.json").read_text())["ok"] and (run_dir / "result.json").exists()


# -- two hosts, one behind a throttled link ---------------------------------------------------------
@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    reason = why_not() or (None if subprocess.run(["tc", "-V"], capture_output=True).returncode == 0 else
                           "tc not installed (apt-get install iproute2)")
    if reason:
        pytest.skip(f"cannot make two network-namespace hosts here: {reason}")
    with two_hosts(tmp_path_factory.mktemp("hosts"), subnet=7) as made:
        yield made


@pytest.fixture
def throttled(hosts: Hosts) -> Iterator[str]:
    """The second host's end of the link shaped to 20 Mbit/s (what it sends: half of every all-reduce)."""
    ns = hosts.namespaces[1]
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", IFNAME, "root", "tbf", "rate", "20mbit",
                    "burst", "32kbit", "latency", "400ms"], check=True, capture_output=True)
    try:
        yield hosts.addrs[1]
    finally:
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", IFNAME, "root"], capture_output=True)


def on_first_host(hosts: Hosts, *args: str) -> tuple[int, str, str]:
    """``python -m launcher ARGS`` on host 0, gloo on the hosts' shared link."""
    argv = hosts.exec_argv(0, [sys.executable, "-m", "launcher", *args])
    proc = subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "GLOO_SOCKET_IFNAME": IFNAME})
    return finish(proc, timeout=180)


def verdicts(out: str) -> dict[str, str]:
    """host -> verdict column, from the printed table."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("host "))
    at = lines[head].index("verdict")
    return {line.split()[0]: line[at:].strip() for line in lines[head + 1:] if line and not line.startswith("link:")}


@pytest.mark.slow
@pytest.mark.multinode
def test_two_healthy_hosts_pass(hosts: Hosts) -> None:
    code, out, err = on_first_host(hosts, "preflight", "--hosts", ",".join(hosts.addrs),
                                   "--ssh-config", str(hosts.ssh_config))
    assert code == 0, out + err
    assert verdicts(out) == {hosts.addrs[0]: "ok", hosts.addrs[1]: "ok"}
    assert f"gloo all-reduce of 2 MB with {hosts.addrs[0]}" in out


@pytest.mark.slow
@pytest.mark.multinode
def test_throttled_host_is_named_and_the_launch_refused(hosts: Hosts, throttled: str, tmp_path: Path) -> None:
    code, out, err = on_first_host(hosts, "preflight", "--hosts", ",".join(hosts.addrs),
                                   "--ssh-config", str(hosts.ssh_config))
    assert code == 2, out + err
    assert verdicts(out) == {hosts.addrs[0]: "ok", throttled: "slow link"}, out + err
    assert f"launcher: preflight: {throttled}: link to {hosts.addrs[0]}" in err
    assert f"launcher: preflight failed on {throttled}\n" in err

    run_dir = tmp_path / "run"
    (tmp_path / "hosts").write_text("".join(f"{a} slots=2\n" for a in hosts.addrs))
    code, out, err = on_first_host(hosts, "--preflight", "--hostfile", str(tmp_path / "hosts"), "--ssh-config",
                                   str(hosts.ssh_config), "--run-dir", str(run_dir), "trainer.max_steps=5")
    assert code == 2 and "launcher: --preflight: not starting" in err, out + err
    assert "launcher: starting" not in out and not (run_dir / "plan.json").exists()
    record = json.loads((run_dir / "preflight.json").read_text())
    assert [p["host"] for p in record["problems"]] == [throttled]
