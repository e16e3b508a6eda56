"""Parameter and multiply-accumulate counts per image, for the scaling planner.

MACs are counted with forward hooks on convolutions and linear layers only, the convention
behind the usual figures (AlexNet about 0.71 G, ResNet-50 about 4.1 G): BatchNorm, pooling,
activations and additions are left out (together they add well under 1% for these nets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ModelProfile", "count_params", "profile_model"]


@dataclass(frozen=True)
class ModelProfile:
    """params: trainable and frozen parameters; macs: forward multiply-accumulates per image."""

    params: int
    macs: int

    @property
    def flops(self) -> int:
        """Forward floating-point operations per image, counting a multiply-add as two."""
        return 2 * self.macs


def count_params(model: nn.Module) -> int:
    """Number of distinct parameter elements (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters())


def _conv_macs(module: nn.modules.conv._ConvNd, out: Tensor) -> int:
    # every output element is a dot product over in_channels/groups x kernel elements
    kernel = 1
    for k in module.kernel_size:
        kernel *= k
    return out[0].numel() * (module.in_channels // module.groups) * kernel


def _linear_macs(module: nn.Linear, out: Tensor) -> int:
    # out[0] covers any leading dims beyond the batch (e.g. tokens); each element costs in_features
    return out[0].numel() * module.in_features


def profile_model(model: nn.Module, input_shape: tuple[int, int, int]) -> ModelProfile:
    """Count parameters and forward MACs for one image of ``input_shape`` = (C, H, W).

    Runs one forward pass of a batch of one in eval mode, without gradients, on the model's
    own device and dtype; the model's training flag is restored afterwards.
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    macs = 0

    def hook(module: nn.Module, _inputs: tuple, out: Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.modules.conv._ConvNd):
            macs += _conv_macs(module, out)
        elif isinstance(module, nn.Linear):
            macs += _linear_macs(module, out)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return ModelProfile(params=count_params(model), macs=macs)
