"""Argument types and the hostfile parser shared by ``python -m launcher`` (cli.py) and its ``preflight`` command."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from launcher.errors import UsageError


def number(kind: type, low: float, high: float = float("inf")) -> Callable[[str], float]:
    """An argparse type: ``kind`` within [low, high]; anything else is a usage error naming the range."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not low <= value <= high or value != value:  # value != value: NaN
            allowed = f"at least {low:g}" if high == float("inf") else f"within {low:g}..{high:g}"
            raise argparse.ArgumentTypeError(f"{text} must be {allowed}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def NODES(text: str) -> int | tuple[int, int]:  # noqa: N802 - an argparse type, named like the others
    """``N`` or ``MIN:MAX`` (torchrun's --nnodes)."""
    low, colon, high = text.partition(":")
    if not colon:
        return COUNT(text)
    least, most = COUNT(low), COUNT(high)
    if least > most:
        raise argparse.ArgumentTypeError(f"{text}: MIN must not exceed MAX")
    return (least, most)


COUNT, INDEX, PORT, SECONDS = number(int, 1), number(int, 0), number(int, 1, 65535), number(float, 0)


def parse_hostfile(path: Path) -> list[str]:
    """DeepSpeed/MPI 'host slots=N [gpus=0,2]' or horovod 'host:N' lines -> ['host:N', 'host:N@0,2', ...];
    '#' starts a comment. ``gpus=`` pins the GPUs that host's ranks use (CUDA_VISIBLE_DEVICES)."""
    if not path.is_file():
        raise UsageError(f"hostfile {path} does not exist")
    hosts = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        devices = ""
        if len(parts) == 3 and parts[2].startswith("gpus="):
            devices = parts.pop()[len("gpus="):]
            if not all(d.isdigit() for d in devices.split(",")):
                raise UsageError(f"{path}:{number}: bad gpus= in {raw.strip()!r}: expected GPU indices, e.g. gpus=0,2")
        name, colon, slots = parts[0].partition(":")
        if len(parts) == 2 and not colon and parts[1].startswith("slots="):
            colon, slots = ":", parts[1][len("slots="):]
        elif len(parts) != 1:
            name = ""
        if name and (not colon or slots.isdigit() and int(slots) > 0):
            hosts.append(f"{name}{colon}{slots}" + (f"@{devices}" if devices else ""))
        else:
            raise UsageError(f"{path}:{number}: bad hostfile line {raw.strip()!r}: expected 'host slots=N "
                             "[gpus=0,1]' or 'host:N'")
    if not hosts:
        raise UsageError(f"hostfile {path} lists no hosts")
    return hosts
