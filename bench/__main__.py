"""Benchmarks, measured side by side and reported as ratios.

    python -m bench                      # every suite
    python -m bench overhead checkpoint  # some suites
    python -m bench --tiny --repeats 1   # seconds: a smoke run (what the tests do)
    python -m bench check [--readme]     # the latest results against their goals (bench/check.py)

Each suite prints a table and writes bench/results/<suite>.json and <suite>.png. Comparisons run
interleaved, repeated (median, min, max), because absolute times on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import RESULTS, save
from bench.data_suite import data
from bench.elastic_commit_suite import elastic_commit
from bench.goodput_suite import goodput, goodput_horovod, goodput_lm
from bench.recovery_suite import recovery
from bench.suites import SUITES

SUITES = {**SUITES, "data": data, "recovery": recovery, "goodput": goodput,  # bench/*_suite.py
          "goodput_lm": goodput_lm, "goodput_horovod": goodput_horovod, "elastic_commit": elastic_commit}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check"]:  # not a suite: reads the results, measures nothing
        from bench.check import main as check

        return check(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", choices=[*SUITES, []], help=f"default: all of {', '.join(SUITES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that the suites run")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default {RESULTS})")
    args = p.parse_args(argv)
    for name in args.suites or list(SUITES):
        print(f"== {name}", flush=True)
        payload, plot, text = SUITES[name](args.repeats, args.tiny)
        out = save(name, {**payload, "tiny": args.tiny, "repeats": args.repeats}, plot, args.out)
        print(text)
        print(f"-> {out} (+ .png)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
