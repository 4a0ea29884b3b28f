"""The trainer each rank runs: ``python -m workers.train --run-dir RUN_DIR`` (started by the launcher)."""
