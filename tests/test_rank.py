"""workers.rank: a program run under it records how it ended, unmodified otherwise (real processes, no torch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT


def run_rank(tmp_path: Path, code: str, *, rank: int = 1, attempt: int = 0, **env: str) -> subprocess.Popen:
    script = tmp_path / "prog.py"
    script.write_text(code)
    return subprocess.Popen([sys.executable, "-m", "workers.rank", str(script), "--flag"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "LAUNCHER_RUN_DIR": str(tmp_path),
                                 "RANK": str(rank), "WORLD_SIZE": "2", "LAUNCHER_ATTEMPT": str(attempt), **env})


def record(tmp_path: Path, rank: int = 1, attempt: int = 0, kind: str = "exit.json") -> dict:
    return json.loads((tmp_path / "attempts" / str(attempt) / f"rank{rank}.{kind}").read_text())


def test_exit_code_argv_and_main_are_the_programs(tmp_path: Path) -> None:
    proc = run_rank(tmp_path, "import sys\nprint(__name__, sys.argv[1:])\nsys.exit(3)\n")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and out.strip() == "__main__ ['--flag']"
    assert (record(tmp_path)["exit_code"], record(tmp_path)["signal"]) == (3, None)
    assert record(tmp_path, kind="progress")["phase"] == "failed"


def test_an_exception_is_recorded_in_torchruns_error_file_format(tmp_path: Path) -> None:
    proc = run_rank(tmp_path, "raise ValueError('bad thing')\n")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "ValueError: bad thing" in err
    rec = record(tmp_path)
    error = json.loads(Path(rec["error_file"]).read_text())
    assert error["message"]["message"] == "ValueError: bad thing"
    assert "ValueError: bad thing" in error["message"]["extraInfo"]["py_callstack"]


def test_an_unhandled_sigterm_is_recorded_and_still_kills(tmp_path: Path) -> None:
    proc = run_rank(tmp_path, "import time\nprint('up', flush=True)\ntime.sleep(60)\n")
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGTERM  # died of it, as without the wrapper
    assert (record(tmp_path)["signal"], record(tmp_path)["exit_code"]) == ("SIGTERM", 143)


def test_sigusr2_dumps_every_threads_stack(tmp_path: Path) -> None:
    proc = run_rank(tmp_path, "import time\ndef waiting_here():\n    print('up', flush=True)\n    time.sleep(60)\n"
                              "waiting_here()\n")  # 'up' from inside: the signal finds it there
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    proc.send_signal(signal.SIGUSR2)
    stacks = tmp_path / "attempts" / "0" / "rank1.stacks"
    deadline = time.monotonic() + 30
    while "waiting_here" not in stacks.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert "waiting_here" in stacks.read_text()


@pytest.mark.parametrize(("attempt", "waits"), [(0, False), (1, True)])
def test_a_restart_waits_the_backoff(tmp_path: Path, attempt: int, waits: bool) -> None:
    began = time.monotonic()
    proc = run_rank(tmp_path, "pass\n", rank=0, attempt=attempt, LAUNCHER_RESTART_BACKOFF_S="1.5")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and record(tmp_path, rank=0, attempt=attempt)["exit_code"] == 0
    assert ("backoff" in out) == waits
    if waits:
        assert time.monotonic() - began >= 1.5


def test_the_backoff_counts_from_the_failure_and_doubles_in_a_crash_loop(tmp_path: Path) -> None:
    from workers.contract import attempt_dir
    from workers.rank import MAX_BACKOFF_S, backoff_ends

    def attempt(n: int, *records: tuple[str, str]) -> None:
        attempt_dir(tmp_path, n).mkdir(parents=True, exist_ok=True)
        for name, text in records:
            (attempt_dir(tmp_path, n) / name).write_text(text)

    assert backoff_ends(tmp_path, 1, 1.5, now=100.0) == 101.5  # no record at all: the whole delay from now
    attempt(0, ("rank0.progress", '{"first_step_at": 0.0, "at": 88.0}      '))
    assert backoff_ends(tmp_path, 1, 1.5, now=100.0) == 89.5  # SIGKILL (no exit record): from its last sign of life
    attempt(0, ("rank1.exit.json", '{"at": 90.0}'), ("rank0.exit.json", '{"at": 91.0}'))
    assert backoff_ends(tmp_path, 1, 1.5, now=100.0) == 91.5  # from the first failure: already over
    for n in (1, 2):  # restarts 1 and 2 failed before their first step: a crash loop
        attempt(n, ("rank0.exit.json", '{"at": 90.0}'), ("rank0.progress", '{"first_step_at": 0.0, "at": 89.0}'))
    assert backoff_ends(tmp_path, 3, 1.5, now=100.0) == 96.0  # doubled per restart in it
    attempt(1, ("rank0.progress", '{"first_step_at": 80.0, "at": 89.0}'))
    assert backoff_ends(tmp_path, 3, 1.5, now=100.0) == 93.0  # restart 1 trained: the loop is restart 2 alone
    attempt(2, ("rank0.progress", '{"first_step_at": 85.0, "at": 89.0}'))
    assert backoff_ends(tmp_path, 3, 1.5, now=100.0) == 91.5  # the last one trained: the base again
    for n in range(3, 21):
        attempt(n, ("rank0.exit.json", '{"at": 90.0}'))
    assert backoff_ends(tmp_path, 20, 1.5, now=100.0) == 90.0 + MAX_BACKOFF_S
    assert backoff_ends(tmp_path, 1, 0.0, now=100.0) == 100.0


# -- LAUNCHER_HOOKS (workers/hooks.py) --------------------------------------------------------------------------
def test_hooks_modules_are_imported_and_rank_start_runs_before_the_rank_reports_in(tmp_path: Path) -> None:
    (tmp_path / "probe_hooks.py").write_text(
        "from pathlib import Path\nfrom workers import hooks\n\n"
        "def started(attempt):\n"
        "    reported = Path('attempts/2/rank1.progress').exists()\n"
        "    Path('started').write_text(f'{attempt} {reported}')\n\n"
        "hooks.rank_start.append(started)\n")
    proc = run_rank(tmp_path, "print('ran')\n", attempt=2, LAUNCHER_HOOKS="probe_hooks")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "ran", err
    assert (tmp_path / "started").read_text() == "2 False"  # the attempt, before the progress file existed
    assert record(tmp_path, attempt=2, kind="progress")["phase"] == "done"


def test_a_hooks_module_that_does_not_import_fails_the_rank_and_is_named(tmp_path: Path) -> None:
    proc = run_rank(tmp_path, "print('ran')\n", LAUNCHER_HOOKS="probe_hooks_nowhere")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "ran" not in out
    assert "LAUNCHER_HOOKS names 'probe_hooks_nowhere', which does not import here" in err
    (record,) = (tmp_path / "attempts" / "0").glob("rank*.exit.json")  # a failure the launcher reports, no retry
    assert json.loads(record.read_text())["exit_code"] == 1
