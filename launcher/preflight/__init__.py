"""Preflight wing: ``python -m launcher preflight`` and ``--preflight``. checks.py decides and reports,
gather.py runs probe.py on every host at once (over ssh) and measures the links between them.

May import: launcher.args, launcher.errors, launcher.resources, launcher.plan, workers.ports,
workers.table."""
