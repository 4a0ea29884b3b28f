"""``python -m workers.export RUN_DIR --out DIR [--step N] [--quantize]``: see workers/export/__init__.py."""

import sys

from workers.export import main

sys.exit(main())
