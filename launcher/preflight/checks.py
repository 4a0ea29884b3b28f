"""Pre-flight: ``python -m launcher preflight [--hosts …|--hostfile F]``, and ``--preflight`` before a launch.

Every host runs ``python -m launcher.preflight.probe`` (over ssh, all at once; this machine without ssh): versions, GPUs
and their health, the rendezvous port, a local all-reduce. Then the first host all-reduces with each other host
in turn (gloo over TCP, one rank on each: the link). judge() turns the results into problems, each naming
its host and the fix; any problem is exit 2, and a launch with ``--preflight`` does not start.

Slow means at most half the reference: for a host's local all-reduce, the median of the other hosts' (same
backend); for a link, the median of the other links. When only one link was measured (two hosts), at most a
tenth of gloo over the first host's loopback (which no network matches). The first host is each link's other
end, so a slow link names the other host.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher import resources
from launcher.args import COUNT, PORT, parse_hostfile
from launcher.errors import UsageError
from launcher.plan.planner import DEFAULT_MASTER_PORT, parse_host
from launcher.plan.ssh import exported_env
from launcher.plan.types import LaunchPlan
from launcher.preflight.gather import Host, Target, gather
from launcher.preflight.probe import SERIOUS_XIDS  # no torch import: that is inside its functions
from workers.table import format_table

SLOW = 0.5  # at most this fraction of the reference is slow (2x slower)
# A lone link has no other link to be compared with, only gloo over the first host's loopback, and loopback is no
# network (a 64 KB MTU, no NIC): a healthy 10 GbE link reaches 0.15-0.4 of it. So a lone link is slow at a tenth:
# what a link negotiated down to 1 Gb/s, or shaped, does.
LONE_LINK_SLOW = 0.1


@dataclass(frozen=True)
class Problem:
    host: str
    label: str  # the table's verdict column
    line: str  # what is wrong, and the fix


# -- the verdict ----------------------------------------------------------------------------------
def slow_ones(values: Mapping[str, float]) -> dict[str, float]:
    """{name: reference} for each value at most SLOW x the median of the others (nothing with fewer than 2)."""
    if len(values) < 2:
        return {}
    out = {}
    for name, value in values.items():
        ref = statistics.median(v for n, v in values.items() if n != name)
        if value <= SLOW * ref:
            out[name] = ref
    return out


def _versions(ok: list[Host], key: str, what: str) -> list[Problem]:
    """Hosts whose ``key`` differs from the most common value (a tie: the first host's)."""
    seen = {h.name: h.probe[key] for h in ok if h.probe and h.probe.get(key)}
    if len(set(seen.values())) < 2:
        return []
    counts = Counter(seen.values())
    ref = max(counts, key=lambda v: (counts[v], v == next(iter(seen.values()))))
    with_ref = ", ".join(n for n, v in seen.items() if v == ref)
    return [Problem(n, f"{what} {v}", f"{n} runs {what} {v}; {with_ref} run {what} {ref}. HINT: install {what} "
                    f"{ref} on {n} (every host needs the same Python, torch and NCCL)")
            for n, v in seen.items() if v != ref]


def _unreached(hosts: Sequence[Host]) -> list[Problem]:
    """Hosts with no report: ssh did not get there, or the probe failed on it."""
    found = []
    for h in hosts:
        if h.reachable == "no":
            found.append(Problem(h.name, "unreachable", f"{h.name} is unreachable over ssh ({h.error}). HINT: check "
                                 f"that `ssh {h.name} true` works without a password (BatchMode), or fix the hostfile"))
        elif h.probe is None:
            found.append(Problem(h.name, "probe failed", f"the probe failed on {h.name} ({h.error}). HINT: every "
                                 "host needs the launcher's working directory and interpreter, with torch "
                                 "(one shared filesystem)"))
    return found


def _health(h: Host, gpu_hosts: list[str]) -> list[Problem]:
    """What is wrong with one host by its own report: GPUs, backends, ECC errors and XIDs, the port, the local
    all-reduce."""
    p, found = h.probe or {}, []
    if gpu_hosts and not p["cuda"]:
        found.append(Problem(h.name, "no GPU", f"{h.name} has no usable CUDA device, but {', '.join(gpu_hosts)} "
                             f"do. HINT: check `nvidia-smi` and the driver on {h.name}, and CUDA_VISIBLE_DEVICES"))
    elif p["cuda"] and h.slots and p["gpus"] < h.slots:
        found.append(Problem(h.name, f"{p['gpus']} GPUs", f"{h.name} has {p['gpus']} GPU(s) for {h.slots} ranks. "
                             f"HINT: give it {p['gpus']} slots ({h.name}:{p['gpus']}) or fix its GPUs"))
    if not p["cuda"] and not p["gloo"]:
        found.append(Problem(h.name, "no gloo", f"torch on {h.name} has no gloo backend. HINT: install a torch "
                             "build with distributed support"))
    if p.get("ecc_errors"):
        found.append(Problem(h.name, "ECC errors", f"{h.name}: {p['ecc_errors']} uncorrected ECC error(s). HINT: "
                             "drain the node; `nvidia-smi -q -d ECC`, then reset the GPU or replace it"))
    if bad := sorted(set(p.get("xids") or ()) & SERIOUS_XIDS):
        found.append(Problem(h.name, f"XID {','.join(map(str, bad))}", f"{h.name}: NVIDIA XID "
                             f"{', '.join(map(str, bad))} in the kernel log. HINT: drain the node; see "
                             "`dmesg | grep Xid` and NVIDIA's XID catalogue"))
    if p.get("port_free") is False:
        found.append(Problem(h.name, f"port {p['port']} busy", f"{h.name}: the rendezvous port {p['port']} is in "
                             f"use. HINT: stop what listens there (`ss -ltnp 'sport = :{p['port']}'`) or pick "
                             "another with --master-port"))
    if p.get("local_error"):
        found.append(Problem(h.name, "local all-reduce failed", f"{h.name}: {p['local_error']}. HINT: run "
                             f"`python -m launcher.preflight.probe` on {h.name} to see the whole error"))
    return found


def _slow_local(ok: Sequence[Host]) -> list[Problem]:
    """Hosts whose local all-reduce is slow next to the others' on the same backend."""
    found = []
    for backend in ("gloo", "nccl"):
        local = {h.name: h.probe["local_gbps"] for h in ok
                 if h.probe and h.probe["local_backend"] == backend and h.probe["local_gbps"]}
        for name, ref in slow_ones(local).items():
            found.append(Problem(name, "slow local", f"{name}: local all-reduce {local[name]:.3g} GB/s, the others' "
                                 f"median {ref:.3g} GB/s. HINT: look for other jobs on it (top, nvidia-smi), clocks "
                                 "and throttling, and for GPUs the NVLink/PCIe topology (`nvidia-smi topo -m`)"))
    return found


def _links(hosts: Sequence[Host]) -> list[Problem]:
    """Links to the first host that failed, or are slow (link_reference)."""
    found = []
    first = hosts[0].name if hosts else ""
    for h in hosts[1:]:
        if h.link_error:
            found.append(Problem(h.name, "no link", f"all-reduce between {first} and {h.name} failed "
                                 f"({h.link_error}). HINT: let TCP through between the hosts, and set "
                                 "GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME) to the interface they share"))
    links, ref, factor = link_reference(hosts)
    against = "the other links' median" if len(links) > 1 else f"gloo over {first}'s loopback"
    for name, value in links.items():
        if ref.get(name) and value <= factor * ref[name]:
            found.append(Problem(name, "slow link", f"{name}: link to {first} {value:.3g} GB/s, at most {factor:g}x "
                                 f"{against} ({ref[name]:.3g} GB/s)."
                                 f" HINT: check {name}'s network: `ethtool` speed, errors, MTU, a traffic shaper "
                                 f"(`tc qdisc show`), or leave {name} out"))
    return found


def judge(hosts: Sequence[Host]) -> list[Problem]:
    """Everything that makes these hosts unfit to train together; [] when all is well."""
    ok = [h for h in hosts if h.probe is not None]
    gpu_hosts = [h.name for h in ok if h.probe and h.probe["cuda"]]
    return [*_unreached(hosts),
            *_versions(ok, "python", "Python"), *_versions(ok, "torch", "torch"), *_versions(ok, "nccl", "NCCL"),
            *(problem for h in ok for problem in _health(h, gpu_hosts)),
            *_slow_local(ok), *_links(hosts)]


def link_reference(hosts: Sequence[Host]) -> tuple[dict[str, float], dict[str, float], float]:
    """({host: link GB/s}, {host: its reference}, the fraction of it that is slow): the median of the other links
    (SLOW), or for a lone link the first host's loopback (LONE_LINK_SLOW)."""
    links = {h.name: h.link_gbps for h in hosts[1:] if h.link_gbps}
    if len(links) > 1:
        return links, {n: statistics.median(v for m, v in links.items() if m != n) for n in links}, SLOW
    loopback = (hosts[0].probe or {}).get("loopback_gbps") if hosts else None
    return links, {n: loopback for n in links if loopback}, LONE_LINK_SLOW


# -- the table ------------------------------------------------------------------------------------
def rows(hosts: Sequence[Host], problems: Sequence[Problem]) -> list[dict[str, str]]:
    def gbps(v: float | None) -> str:
        return f"{v:.3g}" if v else "-"

    out = []
    for h in hosts:
        p = h.probe or {}
        backend = (f"nccl {p['nccl']}" if p.get("cuda") else "gloo" if p.get("gloo") else "-") if p else "-"
        port = {True: "free", False: "busy"}.get(p.get("port_free"), "-")  # type: ignore[arg-type]
        labels = [q.label for q in problems if q.host == h.name]
        out.append({"host": h.name, "reachable": h.reachable, "python": p.get("python", "-"),
                    "torch": p.get("torch", "-"), "backend": backend, "gpus": str(p.get("gpus", "-")), "port": port,
                    "local GB/s": gbps(p.get("local_gbps")), "link GB/s": gbps(h.link_gbps),
                    "verdict": "; ".join(labels) or "ok"})
    return out


def table(records: Sequence[Mapping[str, str]]) -> str:
    cols = list(records[0])
    return format_table([cols, *[[r[c] for c in cols] for r in records]])


def check(target: Target, env: Mapping[str, str], record: Path | None = None) -> int:
    """Probe (``env``: the launcher's environment), print the table and the problems; write ``record`` (JSON) if
    given. 0 if all is well, 2 if not, 130 after Ctrl-C."""
    started = time.monotonic()
    try:
        hosts = gather(target, {**env, **target.env})
    except KeyboardInterrupt:  # Ctrl-C reached the probes too (one process group; ssh ends its remote one)
        print("launcher: preflight interrupted", file=sys.stderr, flush=True)
        return 130
    problems = judge(hosts)
    records = rows(hosts, problems)
    links, refs, factor = link_reference(hosts)
    print(f"launcher: preflight of {len(hosts)} host(s) in {time.monotonic() - started:.0f} s\n{table(records)}")
    if links:
        ref = next(iter(refs.values()), None)
        basis = ("the median of the other links" if len(links) > 1 else
                 f"{hosts[0].name}'s loopback ({ref:.3g} GB/s)" if ref else "nothing (no loopback measured)")
        print(f"link: gloo all-reduce of {target.mb:g} MB with {hosts[0].name}; slow at <= {factor:g}x {basis}",
              flush=True)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"ok": not problems, "table": records, "problems": [asdict(p) for p in problems],
                                      "hosts": [asdict(h) for h in hosts]}, indent=1))
    for p in problems:
        print(f"launcher: preflight: {p.line}", file=sys.stderr)
    if problems:
        names = ", ".join(dict.fromkeys(p.host for p in problems))
        print(f"launcher: preflight failed on {names}", file=sys.stderr, flush=True)
    return 2 if problems else 0


def target_of(plan: LaunchPlan) -> Target:
    pythonpath = {"PYTHONPATH": plan.env["PYTHONPATH"]} if "PYTHONPATH" in plan.env else {}
    port = plan.master_port if plan.hosts or plan.node_rank == 0 else None  # node 0 hosts the rendezvous
    return Target(hosts=plan.hosts or ((socket.gethostname(), plan.nproc_per_node),), port=port,
                  python=plan.python, workdir=plan.workdir, env={**plan.forwarded_env, **pythonpath},
                  ssh_config=plan.ssh_config, ssh_timeout=plan.ssh_timeout, local=not plan.hosts)


def gate(plan: LaunchPlan, env: Mapping[str, str]) -> int:
    """``--preflight``: check the plan's hosts before anything starts; the table goes to RUN_DIR/preflight.json."""
    code = check(target_of(plan), env, record=plan.run_dir / "preflight.json")
    if code == 2:
        print("launcher: --preflight: not starting", file=sys.stderr, flush=True)
    return code


# -- python -m launcher preflight ------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}. HINT: python -m launcher preflight --help")


def main(argv: Sequence[str], env: Mapping[str, str]) -> int:
    p = _Parser(prog="python -m launcher preflight", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", default=None, help="comma-separated hosts, NAME or NAME:SLOTS (default: this machine)")
    p.add_argument("--hostfile", type=Path, default=None, help="'host slots=N' or 'host:N' per line")
    p.add_argument("--gpus", type=COUNT, default=None, help="ranks per host: each needs as many GPUs")
    p.add_argument("--master-port", type=PORT, default=None,
                   help=f"rendezvous port to check on the first host (default {DEFAULT_MASTER_PORT} with hosts)")
    p.add_argument("--ssh-config", type=Path, default=None, help="ssh -F FILE")
    p.add_argument("--ssh-timeout", type=COUNT, default=10, help="ssh connect timeout in seconds (default 10)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = p.parse_args(list(argv))
    entries = [*(args.hosts.split(",") if args.hosts else []),
               *(parse_hostfile(args.hostfile) if args.hostfile else [])]
    hosts = tuple(parse_host(e, args.gpus)[:2] for e in entries)  # type: ignore[arg-type]  # None: slots not known
    forwarded = exported_env(env)  # as a launch forwards them, and the checkout on the path (launcher.plan.planner)
    if pythonpath := resources.pythonpath(env):
        forwarded["PYTHONPATH"] = pythonpath
    target = Target(hosts=hosts or ((socket.gethostname(), args.gpus),),
                    port=args.master_port or (DEFAULT_MASTER_PORT if hosts else None), python=sys.executable,
                    workdir=Path.cwd(), env=forwarded, ssh_config=args.ssh_config, ssh_timeout=args.ssh_timeout,
                    local=not hosts)
    return check(target, env, record=args.json)
