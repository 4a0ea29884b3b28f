#!/usr/bin/env bash
# Install everything the tests need (scripts/setup.sh --test), lint, then run the full test suite.
# Quick tier only: python -m pytest -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
python3 -m ruff check .
python3 -m pytest -q --durations=15 "$@"  # the 15 slowest: where the suite's time goes
