"""A model factory importable by job files in the batch-job tests."""

from torch import nn


def make_mlp(width: int = 5) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))
