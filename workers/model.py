"""Models the built-in trainer can train."""

from __future__ import annotations

from torch import nn

from workers.config import ModelConfig
from workers.data import Splits
from workers.gpt import GPT


def build_model(cfg: ModelConfig, data: Splits) -> nn.Module:
    """mlp: the seeds' classifier, input -> hidden -> classes with a ReLU; gpt: a small decoder."""
    if cfg.name == "gpt":
        return GPT(data.num_classes, data.context, cfg.layers, cfg.heads, cfg.width)
    return nn.Sequential(nn.Linear(data.num_features, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, data.num_classes))
