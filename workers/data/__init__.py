"""Data wing: builtin.py (example datasets), sampler.py (resumable, sharded), loader.py (the DataLoader
pipeline), stream.py (records of mode=online).

May import: torch, workers.config (the stream's settings); the trainer builds these from the config."""
