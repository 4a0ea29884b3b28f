"""The default classifier: input -> hidden -> classes with a ReLU."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    def __init__(self, inputs: int, hidden: int, classes: int) -> None:
        super().__init__(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))
