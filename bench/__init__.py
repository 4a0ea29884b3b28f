"""Benchmarks: ``python -m bench [SUITE ...] [--repeats N] [--tiny]``. See bench/__main__.py."""
