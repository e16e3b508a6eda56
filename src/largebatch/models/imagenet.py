"""torchvision's AlexNet and ResNet-50, untrained, with the options large-batch recipes use."""

from __future__ import annotations

import torchvision
from torch import nn

__all__ = ["alexnet", "resnet50"]


def alexnet(num_classes: int, in_channels: int = 3, dropout: float = 0.5) -> nn.Module:
    """torchvision's AlexNet (64-192-384-256-256 filters, no normalisation, 61.1 M parameters)."""
    model = torchvision.models.alexnet(weights=None, num_classes=num_classes, dropout=dropout)
    if in_channels != 3:
        old = model.features[0]
        model.features[0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
    return model


def resnet50(num_classes: int, in_channels: int = 3, zero_init_residual: bool = False) -> nn.Module:
    """torchvision's ResNet-50 (v1.5: stride on the 3x3 conv, 25.6 M parameters).

    ``zero_init_residual=True`` starts the last BatchNorm of every residual block at gamma = 0,
    so each block begins as the identity (Goyal et al. 2017, "zero-gamma"), which helps at large
    batch sizes.
    """
    model = torchvision.models.resnet50(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
    )
    if in_channels != 3:
        old = model.conv1
        model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model
