"""Test hooks, read from the environment once, here only. Off unless a test sets them.

``LAUNCHER_TEST_SLOW_SAVE_S``  seconds to pause on every write() into a checkpoint file, so a test
                               can kill rank 0 in the middle of a save.
``LAUNCHER_TEST_SLOW_STEP_S``  seconds to pause after every training step, so a test can act mid-run.
``LAUNCHER_TEST_SAMPLE_LOG``   directory: each rank appends the dataset indices it trains on to
                               ``rank<R>.txt``, so a test can check which samples an epoch saw.
"""

from __future__ import annotations

import os

SLOW_SAVE_S = float(os.environ.get("LAUNCHER_TEST_SLOW_SAVE_S", "0") or 0)
SLOW_STEP_S = float(os.environ.get("LAUNCHER_TEST_SLOW_STEP_S", "0") or 0)
SAMPLE_LOG = os.environ.get("LAUNCHER_TEST_SAMPLE_LOG") or None
