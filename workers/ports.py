"""Free TCP ports, for a rendezvous store or a probe to listen on (the launcher and the ranks both ask)."""

from __future__ import annotations

import socket


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free on every address now (held together while picked, so they
    differ); another process may take one before it is used, as with any such pick."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]
