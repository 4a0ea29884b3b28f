"""``python -m workers.export RUN_DIR --out DIR [--step N] [--quantize]``: see workers/export/build.py."""

import sys

from workers.export import main

sys.exit(main())
