"""Node agent: runs on each host of an ssh fan-out, around that node's command (torchrun, usually).

    python -m launcher.node -- ARGV...

It relays the command's output to ssh and reads one word per line from stdin, the launcher's
control channel: ``TERM`` (stop: the ranks checkpoint and exit), ``USR1`` (checkpoint now, to the
rank processes only), ``KILL``. End of input means the launcher or its connection is gone: the
command gets SIGTERM, then SIGKILL after the grace period, so remote ranks never outlive the
launcher (killing the ssh client alone would leave them running). Exits with the command's code.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time

from launcher.procs import GRACE_S, kill_group, signal_ranks


def _relay(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with contextlib.suppress(OSError):  # ssh gone: keep draining so the command never blocks on output
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()


def _shut_down(proc: subprocess.Popen) -> None:
    """The launcher is gone: stop like after Ctrl-C (checkpoint), then kill what is left after the grace."""
    kill_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_group(proc.pid, signal.SIGKILL)


def _control(proc: subprocess.Popen, marker: str) -> None:
    for raw in sys.stdin:
        word = raw.strip()
        if word == "TERM":
            kill_group(proc.pid, signal.SIGTERM)
        elif word == "USR1":
            signal_ranks(proc.pid, marker, signal.SIGUSR1)
        elif word == "KILL":
            kill_group(proc.pid, signal.SIGKILL)
    _shut_down(proc)  # end of input


def main(argv: list[str]) -> int:
    marker = ""
    if argv[:1] == ["--marker"]:
        marker, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m launcher.node [--marker WORD] -- ARGV...")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # sshd's hangup: same as end of input
        signal.signal(sig, lambda *_: threading.Thread(target=_shut_down, args=(proc,), daemon=True).start())
    relay = threading.Thread(target=_relay, args=(proc,), daemon=True)
    relay.start()
    threading.Thread(target=_control, args=(proc, marker), daemon=True).start()
    code = proc.wait()
    relay.join(timeout=5)
    kill_group(proc.pid, signal.SIGKILL)  # stragglers of a finished command
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
