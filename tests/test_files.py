"""The small helpers the ranks and the launcher share: workers/files.py, workers/ports.py, workers/table.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from workers.files import atomic_write, read_json, write_json, write_text
from workers.ports import free_ports
from workers.table import format_table


def test_write_json_round_trips_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "member.json"
    write_json(path, {"status": "running"})
    write_json(path, {"status": "finished", "exit_code": 0})
    assert read_json(path) == {"status": "finished", "exit_code": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["member.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "summary.csv"
    write_text(path, "old\n")

    def half(f: object) -> None:
        f.write(b"new, but")  # type: ignore[attr-defined]
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half, durable=True)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_read_json_of_a_missing_or_partial_file_is_none(tmp_path: Path) -> None:
    (tmp_path / "half.json").write_text('{"step": 1')
    assert read_json(tmp_path / "half.json") is None
    assert read_json(tmp_path / "missing.json") is None


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))


def test_table_aligns_columns_without_trailing_blanks() -> None:
    text = format_table([("host", "verdict"), ("node10", "ok"), ("n2", "")])
    assert text.splitlines() == ["host    verdict", "node10  ok", "n2"]
