"""Runnable examples of the trainer's ``_target_`` nodes: the user's own model, data, loss and metrics.

Run them from the repository root (so ``examples.…`` imports); see examples/README.md.
"""
