"""Online training end to end: a writer appends digits records to a file while 2 ranks learn from it.

Each rank logs the record numbers it trains, per step (test hook LAUNCHER_TEST_SAMPLE_LOG): after a
kill and a restart from the last checkpoint, what the first attempt trained after that checkpoint
was rolled back with the weights, and what is left must be every record exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_bitwise_equal, finish, launch, newest_weights, rank_pids, scalars, start, wait_for

from workers.data.builtin import load_digits_tensors

pytestmark = pytest.mark.slow

N = 3000  # records: the 1797 digits, shuffled, then again: the second pass is where prequential accuracy shows
ONLINE = ["mode=online", "online.source=file", "online.batch_size=1", "online.poll_s=0.02", "online.window=1000",
          "trainer.max_steps=0", "trainer.log_every=50", "trainer.eval_every=100000"]


def digits_lines(n: int = N) -> list[str]:
    x, y = load_digits_tensors()
    order = list(range(len(x)))
    lines = []
    rng = random.Random(0)
    while len(lines) < n:
        rng.shuffle(order)
        lines += [json.dumps({"x": [round(v, 4) for v in x[i].tolist()], "y": int(y[i])}) for i in order]
    return [line + "\n" for line in lines[:n]]


def writer(path: Path, lines: list[str], chunk: int = 100, pause: float = 0.05) -> threading.Thread:
    """Append ``lines`` to ``path`` in chunks, like a log shipper; half lines included now and then."""

    def run() -> None:
        with open(path, "a") as f:
            for i in range(0, len(lines), chunk):
                text = "".join(lines[i : i + chunk])
                cut = len(text) - 7  # a half-written last line first: readers must wait for its newline
                f.write(text[:cut])
                f.flush()
                time.sleep(pause / 2)
                f.write(text[cut:])
                f.flush()
                time.sleep(pause / 2)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def trained(log_dir: Path) -> list[int]:
    """Record numbers trained, over both ranks, with what a restart rolled back left out."""
    out = []
    for rank_file in sorted(log_dir.glob("rank*.txt")):
        kept: list[tuple[int, list[int]]] = []
        for line in rank_file.read_text().splitlines():
            step, *indices = map(int, line.split())
            kept = [(s, i) for s, i in kept if s < step]  # a restart resumes at an earlier step: drop the rest
            kept.append((step, indices))
        out += [i for _, indices in kept for i in indices]
    return sorted(out)


def online_run(run_dir: Path, stream: Path, log: Path, *extra: str):  # noqa: ANN201 (a Popen)
    log.mkdir(exist_ok=True)
    return start(run_dir, *ONLINE, f"online.path={stream}", "online.idle_timeout_s=3", "trainer.checkpoint_every=200",
                 *extra, env={"LAUNCHER_TEST_SAMPLE_LOG": str(log)})


def test_online_file_stream_kill_and_resume_trains_each_record_once(tmp_path: Path) -> None:
    lines = digits_lines()
    # uninterrupted: the records are written while the run reads them
    full, full_stream = tmp_path / "full", tmp_path / "full.jsonl"
    full_stream.touch()
    w = writer(full_stream, lines)
    code, out, err = finish(online_run(full, full_stream, tmp_path / "full_log"))
    w.join()
    assert code == 0, out[-3000:] + err[-3000:]
    assert "online: ended (the stream was silent for 3s)" in out
    assert trained(tmp_path / "full_log") == list(range(N))  # every record once, across the two ranks
    preq = scalars(full, "online/prequential_accuracy")
    assert preq[-1][1] > 0.9 and preq[0][1] < 0.8  # test-then-train accuracy rises as the model learns

    # interrupted: rank 0 is killed mid-stream; torchrun restarts both ranks from the last checkpoint
    cut, cut_stream = tmp_path / "cut", tmp_path / "cut.jsonl"
    cut_stream.touch()
    w = writer(cut_stream, lines)
    proc = online_run(cut, cut_stream, tmp_path / "cut_log", "--max-restarts", "1")
    # the manifest (written after the .pt): the checkpoint is complete before rank 0, its writer, is killed
    wait_for(lambda: list((cut / "checkpoints").glob("step-*.json")) and len(rank_pids(cut)) == 2)
    os.kill(rank_pids(cut)[0], signal.SIGKILL)
    code, out, err = finish(proc)
    w.join()
    assert code == 0, out[-3000:] + err[-3000:]
    assert "resuming the stream after" in out
    assert trained(tmp_path / "cut_log") == list(range(N))
    # the same records in the same order: the same model, to the bit
    assert_bitwise_equal(newest_weights(cut), newest_weights(full))


def test_bad_records_are_skipped_and_idle_timeout_ends_cleanly(tmp_path: Path) -> None:
    good = digits_lines(200)
    bad = {17: "not json at all\n", 40: json.dumps({"x": [0.0] * 3, "y": 1}) + "\n",
           41: json.dumps({"x": [0.0] * 64, "y": 99}) + "\n", 90: "{}\n", 91: json.dumps([0.5] * 65) + "\n"}
    lines = list(good)
    for index in sorted(bad):
        lines.insert(index, bad[index])
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(lines))
    run = tmp_path / "run"
    out, err = launch(run, *ONLINE, f"online.path={stream}", "online.idle_timeout_s=1", "trainer.checkpoint_every=40")
    assert "online: ended (the stream was silent for 1s)" in out and "5 bad records" in out
    for index in bad:
        assert f"skipping bad record on line {index} at {stream}:byte " in out + err
    result = json.loads((run / "result.json").read_text())
    assert result["online/bad_records"] == 5 and result["online/records"] == 200
    assert (run / "checkpoints" / f"step-{result['step']:08d}.pt").exists()  # a checkpoint at the end

    # more records arrive later: a relaunch continues with them, and only them
    stream.open("a").write("".join(digits_lines(260)[200:]))
    log = tmp_path / "log"
    log.mkdir()
    proc = start(run, *ONLINE, f"online.path={stream}", "online.idle_timeout_s=1",
                 env={"LAUNCHER_TEST_SAMPLE_LOG": str(log)})
    code, out, err = finish(proc)
    assert code == 0, out[-2000:] + err[-2000:]
    assert "resuming the stream after 200 records" in out
    assert trained(log) == list(range(200, 260))


def test_shard_directory_stream(tmp_path: Path) -> None:
    shards, lines = tmp_path / "shards", digits_lines(300)
    shards.mkdir()
    for i in range(3):  # written under a hidden name, then renamed: readers never see half a shard
        tmp = shards / f".shard-{i:03d}.jsonl"
        tmp.write_text("".join(lines[i * 100 : (i + 1) * 100]))
        tmp.rename(shards / f"shard-{i:03d}.jsonl")
    log = tmp_path / "log"
    log.mkdir()
    code, out, err = finish(start(tmp_path / "run", *ONLINE, "online.source=shards", f"online.path={shards}",
                                  "online.idle_timeout_s=1", "online.batch_size=5",
                                  env={"LAUNCHER_TEST_SAMPLE_LOG": str(log)}))
    assert code == 0, out[-2000:] + err[-2000:]
    assert trained(log) == list(range(300))
