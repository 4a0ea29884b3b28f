"""What ``python -m launcher preflight`` runs on each host (over ssh): one JSON line describing the host.

``python -m launcher.preflight.probe [--port P] [--ranks N] [--mb M] [--loopback] [--serve]`` prints hostname, Python,
torch, CUDA devices, NCCL and gloo, nvidia-smi's uncorrected ECC count and the kernel log's NVIDIA XIDs (where
readable), whether the rendezvous port P is free, and the all-reduce bandwidth among N local processes (NCCL on
the GPUs, else gloo over loopback; this process is rank 0). ``--loopback`` also measures gloo over loopback on a
GPU host: the reference for a lone link (launcher/preflight/checks.py).

``--serve``: then stay, and for each line ``allreduce RANK ADDR PORT`` on stdin be that rank of a 2-process gloo
all-reduce whose store is at ADDR:PORT (rank 0 hosts it), and answer one JSON line, ``{"gbps": …,
"free_port": …}`` or ``{"error": …}``; end at EOF. The preflight measures each link this way, between
probes already running (no second ssh connection or torch import per link).

Bandwidth is algbw, bytes / seconds per all-reduce (as in bench/allreduce_probe.py), the best of the calls
that fit in a time budget: a loaded machine slows some calls, a slow link slows them all. torch is imported
inside the functions so the launcher's own import stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

from workers.ports import free_port

MIN_CALLS, MAX_CALLS = 3, 400  # timed all-reduces per measurement, within its time budget
LOCAL_BUDGET_S, LINK_BUDGET_S = 2.0, 1.0  # a link is measured alone; the local probes of all hosts at once
# a probe never outlives the preflight that started it, even if its ssh connection is gone without an EOF:
DEADLINE_S = 120  # for its report, and for each link it is asked to measure
IDLE_S = 900  # waiting for its turn in the links (they are measured one after another)
# XIDs that mean the GPU or its links are broken (NVIDIA's XID catalogue): double-bit ECC, row remapping
# failure, NVLink error, fallen off the bus, contained/uncontained ECC, GSP errors. Others (13, 31, 43: an
# application's fault) are listed but do not fail the host.
SERIOUS_XIDS = {48, 63, 64, 74, 79, 92, 94, 95, 119, 120}


def port_free(port: int) -> bool:
    """Whether a listener could bind ``port`` on every address, as the rendezvous store does (SO_REUSEADDR:
    a port left in TIME_WAIT by an earlier run is free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _output(argv: list[str]) -> str | None:
    """stdout of ``argv``, or None when it is missing, fails or takes too long (not root, no driver)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def ecc_errors() -> int | None:
    """Uncorrected ECC errors since the driver loaded, summed over GPUs; None without nvidia-smi."""
    out = _output(["nvidia-smi", "--query-gpu=ecc.errors.uncorrected.volatile.total", "--format=csv,noheader"])
    if out is None:
        return None
    return sum(int(v) for v in out.split() if v.isdigit())  # "[N/A]": ECC off or not reported


def xid_events() -> list[int] | None:
    """The XID codes in this boot's kernel log; None when the log is not readable (dmesg_restrict, no root)."""
    log = _output(["dmesg"]) or _output(["journalctl", "-k", "-b", "--no-pager", "-q"])
    if log is None:
        return None
    return [int(code) for code in re.findall(r"NVRM: Xid \([^)]*\): (\d+)", log)]


def allreduce(rank: int, world: int, addr: str, port: int, mb: float, device: str,
              budget_s: float = LOCAL_BUDGET_S, timeout_s: float = 60) -> float:
    """One rank of a W-process all-reduce of ``mb`` MB; returns this rank's best algbw in GB/s."""
    import torch
    import torch.distributed as dist

    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)  # local probe only: rank == local rank
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(addr, port, world, rank == 0, timeout=timeout)  # rank 0 listens on every address
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    try:
        tensor = torch.ones(max(1, int(mb * 2**20) // 4), device=device)
        dist.all_reduce(tensor)  # warm-up: gloo and NCCL connect on the first call
        # as many calls as fit in the budget (at least a few): on a busy machine most calls are slowed by
        # other processes, so the best of many is the bandwidth. Rank 0 decides for all: every rank must make
        # the same number of calls.
        go, best, calls, started = torch.ones(1, device=device), float("inf"), 0, time.monotonic()
        while go.item():
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(tensor)
            if cuda:
                torch.cuda.synchronize()
            best, calls = min(best, time.perf_counter() - start), calls + 1
            more = calls < MIN_CALLS or (calls < MAX_CALLS and time.monotonic() - started < budget_s)
            go.fill_(float(more))
            dist.broadcast(go, 0)
        return tensor.numel() * 4 / best / 1e9
    finally:
        dist.destroy_process_group()


def start_peers(ranks: int, port: int, mb: float, device: str) -> list[subprocess.Popen]:
    """Ranks 1..N-1 of a local all-reduce on loopback, as child processes (this process is rank 0)."""
    argv = [sys.executable, "-m", "launcher.preflight.probe", "allreduce", "--world", str(ranks), "--addr", "127.0.0.1",
            "--port", str(port), "--mb", str(mb), "--device", device]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # this host's own loopback, whatever interface jobs use
    return [subprocess.Popen([*argv, "--rank", str(r)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, text=True, env=env) for r in range(1, ranks)]


def local_allreduce(ranks: int, mb: float, device: str, port: int | None = None,
                    peers: list[subprocess.Popen] | None = None) -> float:
    """GB/s of an all-reduce among ``ranks`` local processes: this one (rank 0) and ``peers`` (started here
    unless given). RuntimeError naming the reason when it fails."""
    if peers is None:
        port = free_port()
        peers = start_peers(ranks, port, mb, device)
    assert port is not None
    saved = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        return allreduce(0, ranks, "127.0.0.1", port, mb, device)
    except Exception as e:  # noqa: BLE001 - whatever broke, the probe reports it instead of dying
        why = next((p.communicate()[1].strip().splitlines()[-1:] for p in peers if p.poll()), None) or [str(e)]
        raise RuntimeError(f"{device} all-reduce among {ranks} local processes failed: {why[0]}") from e
    finally:
        if saved is None:
            os.environ.pop("GLOO_SOCKET_IFNAME")
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = saved
        for p in peers:
            try:
                p.communicate(timeout=10)  # reads its stderr: a full pipe would block it
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


def report(port: int | None, ranks: int | None, mb: float, loopback: bool) -> dict[str, Any]:
    # no NVIDIA device node: a CPU host, so start the peer now and let its torch import overlap this one's
    cpu_port = free_port()
    peers = None if glob.glob("/dev/nvidia[0-9]*") else start_peers(2, cpu_port, mb, "cpu")

    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    nccl = None
    if cuda:
        version = torch.cuda.nccl.version()  # a tuple in recent torch, an int like 21805 in older ones
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    info: dict[str, Any] = {
        "hostname": socket.gethostname(), "python": platform.python_version(), "torch": str(torch.__version__),
        "cuda": cuda, "gpus": gpus, "gpu_names": [torch.cuda.get_device_name(i) for i in range(gpus)],
        "nccl": nccl, "gloo": dist.is_gloo_available(),
        "ecc_errors": ecc_errors() if cuda else None, "xids": xid_events() if cuda else None,
        "port": port, "port_free": port_free(port) if port else None,
        "free_port": free_port(),  # where a link probe with this host as rank 0 can put its store
        "local_backend": "nccl" if cuda else "gloo", "local_ranks": None, "local_gbps": None, "local_error": None,
        "loopback_gbps": None,
    }
    n = min(ranks or gpus, gpus) if cuda else 2  # GPU: the ranks this host will run; CPU: a pair is enough
    if n >= 2:
        info["local_ranks"] = n
        try:
            if cuda:  # NVLink/PCIe move a few MB in microseconds: launch overhead, not bandwidth
                info["local_gbps"] = local_allreduce(n, max(mb, 64), "cuda")
            else:
                info["local_gbps"] = local_allreduce(2, mb, "cpu", cpu_port, peers)
                peers = None
        except RuntimeError as e:
            info["local_error"] = str(e)
    if loopback:
        with contextlib.suppress(RuntimeError):  # only a reference: the local probe reports the failure
            info["loopback_gbps"] = local_allreduce(2, mb, "cpu") if cuda else info["local_gbps"]
    return info


def serve(mb: float) -> None:
    """Answer ``allreduce RANK ADDR PORT`` lines from stdin until EOF (the preflight's link measurements)."""
    signal.alarm(IDLE_S)
    for line in sys.stdin:
        signal.alarm(DEADLINE_S)  # each request gets the whole deadline
        words = line.split()
        if len(words) != 4 or words[0] != "allreduce":
            continue
        try:
            answer: dict[str, Any] = {"gbps": allreduce(int(words[1]), 2, words[2], int(words[3]), mb, "cpu",
                                                        LINK_BUDGET_S, timeout_s=30)}
        except Exception as e:  # noqa: BLE001 - whatever broke, the preflight names it
            answer = {"error": (str(e).strip().splitlines() or [type(e).__name__])[-1]}
        print(json.dumps({**answer, "free_port": free_port()}), flush=True)  # where the next link can listen
        signal.alarm(IDLE_S)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    signal.alarm(DEADLINE_S)  # SIGALRM's default action ends the process
    p = argparse.ArgumentParser(prog="python -m launcher.preflight.probe")
    p.add_argument("--port", type=int, default=None, help="check that this rendezvous port is free")
    p.add_argument("--ranks", type=int, default=None, help="local all-reduce processes (GPU hosts)")
    p.add_argument("--mb", type=float, default=2.0, help="all-reduce message size in MB")
    if argv[:1] == ["allreduce"]:  # a peer of the local all-reduce (start_peers)
        p.add_argument("--rank", type=int, required=True)
        p.add_argument("--world", type=int, required=True)
        p.add_argument("--addr", required=True)
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        a = p.parse_args(argv[1:])
        allreduce(a.rank, a.world, a.addr, a.port, a.mb, a.device)
        return 0
    p.add_argument("--loopback", action="store_true", help="also measure gloo over loopback (a GPU host)")
    p.add_argument("--serve", action="store_true", help="then answer link requests on stdin until EOF")
    a = p.parse_args(argv)
    print(json.dumps(report(a.port, a.ranks, a.mb, a.loopback)), flush=True)
    if a.serve:
        serve(a.mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
