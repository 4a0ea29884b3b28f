"""Export a trained run for deployment, and serve it.

``python -m workers.export RUN_DIR --out DIR [--step N] [--quantize]``: build.py (its docstring lists what it
writes), with quantize.py for the int8 variant (torchao). ``python -m workers.export.predict DIR [--int8]
< inputs.jsonl``: predict.py runs the exported program.
"""

from workers.export.build import export, main

__all__ = ["export", "main"]
