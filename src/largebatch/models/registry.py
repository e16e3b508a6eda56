"""The model registry: name -> constructor(num_classes, **options) and its natural input size."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from largebatch.models.alexnet_bn import alexnet_bn
from largebatch.models.imagenet import alexnet, resnet50
from largebatch.models.mlp import mlp
from largebatch.models.small import alexnet_bn_small, fmnist_net, resnet_small

__all__ = ["MODEL_NAMES", "build_model", "default_input_size", "model_options"]


@dataclass(frozen=True)
class _Entry:
    build: Callable[..., nn.Module]
    input_size: int  # side of the square input it was designed for


_REGISTRY: dict[str, _Entry] = {
    "alexnet_bn": _Entry(alexnet_bn, 227),
    "alexnet": _Entry(alexnet, 224),
    "resnet50": _Entry(resnet50, 224),
    "alexnet_bn_small": _Entry(alexnet_bn_small, 28),
    "resnet_small": _Entry(resnet_small, 28),
    "fmnist_net": _Entry(fmnist_net, 28),
    "mlp": _Entry(mlp, 28),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def model_options(name: str) -> dict[str, object]:
    """The keyword options a model accepts, with their defaults."""
    params = inspect.signature(_entry(name).build).parameters
    return {k: p.default for k, p in params.items() if k != "num_classes"}


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build an untrained model by registry name.

    Every model takes ``in_channels`` (3 for the ImageNet models, 1 by default for the small
    ones); see :func:`model_options` for the rest. Unknown names or options raise ValueError.
    """
    entry = _entry(name)
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return entry.build(num_classes, **options)


def default_input_size(name: str) -> int:
    """Side of the square input the model is designed for: 227 alexnet_bn, 224 alexnet and
    resnet50, 28 for the small ones (which also take 32)."""
    return _entry(name).input_size
