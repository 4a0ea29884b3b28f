"""Models the built-in trainer can train."""

from __future__ import annotations

from torch import nn

from workers.config import ModelConfig


def build_model(cfg: ModelConfig, num_features: int, num_classes: int) -> nn.Module:
    """The seeds' classifier: input -> hidden -> classes with a ReLU."""
    return nn.Sequential(nn.Linear(num_features, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, num_classes))
