"""Sweep wing: ``-m``/``--multirun``. multirun.py runs Hydra's grid as one normal run per member, plugin.py
lets a Hydra sweeper plugin (Optuna & co.) drive it, record.py keeps members.json and summary.csv.

May import: launcher.single (each member is one run), launcher.config, launcher.backends, launcher.errors,
workers.contract (a member's run directory), workers.files."""
