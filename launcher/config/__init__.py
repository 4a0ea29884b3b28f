"""Config wing: compose the Hydra config and check it before anything starts (compose.py; Hydra's own part, the
overrides and the compose call, in hydra.py), the composed-config cache (cache.py), and safe resume into an existing
run directory (resume.py).

May import: launcher.errors, launcher.resources, workers.config (the ranks' schema), workers.task, workers.contract,
workers.files."""
