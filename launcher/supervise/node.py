"""Node agent: runs on each host of an ssh fan-out, around that node's command (torchrun, usually).

    python -m launcher.supervise.node -- ARGV...

It relays the command's output to ssh and reads one word per line from stdin, the launcher's
control channel: ``TERM`` (stop: the ranks checkpoint and exit), ``KILL``, and ``RANKS SIGUSR1``
(checkpoint now), ``RANKS SIGUSR2`` (stacks), ``RANKS SIGKILL`` to the rank processes only. End of
input, a hangup, or the death of its parent (sshd's session) means the launcher or its connection is
gone: the command gets SIGTERM, then SIGKILL after GONE_GRACE_S (seconds, not the 30 s a ``TERM`` stop
gets), so remote ranks never outlive the launcher (killing the ssh client alone would leave them
running). The command itself gets SIGTERM should the agent die. Exits with the command's code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

from launcher.supervise.procs import GONE_GRACE_S, GRACE_S, kill_group, parent_death_signal, signal_ranks


def _relay(proc: subprocess.Popen) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with contextlib.suppress(OSError):  # ssh gone: keep draining so the command never blocks on output
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()


def _shut_down(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop like after Ctrl-C (checkpoint), then kill what is left after ``grace_s``."""
    kill_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    kill_group(proc.pid, signal.SIGKILL)


def _control(proc: subprocess.Popen, marker: str) -> None:
    for raw in sys.stdin:
        word = raw.strip()
        if word == "TERM":
            kill_group(proc.pid, signal.SIGTERM)
        elif word.startswith("RANKS SIG"):  # to the rank processes only: SIGUSR1 (save), SIGUSR2 (stacks), SIGKILL
            signal_ranks(proc.pid, marker, signal.Signals[word.split()[1]])
        elif word == "KILL":
            kill_group(proc.pid, signal.SIGKILL)
    _shut_down(proc, GONE_GRACE_S)  # end of input: the launcher is gone, nobody will send KILL after a grace


def main(argv: list[str]) -> int:
    marker = ""
    if argv[:1] == ["--marker"]:
        marker, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: python -m launcher.supervise.node [--marker WORD] -- ARGV...")
    parent = os.getppid()
    # no thread runs yet (preexec_fn is unsafe beside threads); this thread lives as long as the command
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=parent_death_signal(signal.SIGTERM))
    graces = {signal.SIGINT: GRACE_S, signal.SIGTERM: GRACE_S, signal.SIGHUP: GONE_GRACE_S}  # hangup: end of input
    for sig in graces:
        signal.signal(sig, lambda signum, _: threading.Thread(target=_shut_down, args=(proc, graces[signum]),
                                                              daemon=True).start())
    parent_death_signal(signal.SIGHUP)()  # sshd's session process gone: a hangup too
    if os.getppid() != parent:  # ... gone before the line above
        signal.raise_signal(signal.SIGHUP)
    relay = threading.Thread(target=_relay, args=(proc,), daemon=True)
    relay.start()
    threading.Thread(target=_control, args=(proc, marker), daemon=True).start()
    code = proc.wait()
    relay.join(timeout=5)
    kill_group(proc.pid, signal.SIGKILL)  # stragglers of a finished command
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
