"""A multi-layer perceptron: no batch statistics, so that data-parallel splits of one global batch
give the same gradients exactly (the trainer's equivalence tests), and many parameters per unit
of compute (the planner's communication-heavy case)."""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]


def mlp(num_classes: int, in_channels: int = 1, image_size: int = 28, hidden: int = 256, depth: int = 2) -> nn.Module:
    """Flatten, then ``depth`` hidden layers of ``hidden`` units with ReLU, then a linear classifier."""
    if depth < 0 or hidden < 1 or image_size < 1 or in_channels < 1:
        raise ValueError("mlp needs depth >= 0 and positive hidden, image_size and in_channels")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
