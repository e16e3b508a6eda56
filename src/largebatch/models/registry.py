"""The model registry: name -> constructor(num_classes, **options) and its natural input size.

Options are checked before anything is built (type from the constructor's annotation, range from
the rules below), so a bad ``model.options`` value ends in one line naming the option instead of a
traceback from deep inside torch.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from largebatch.errors import UserError
from largebatch.models.alexnet_bn import alexnet_bn
from largebatch.models.imagenet import alexnet, resnet50
from largebatch.models.mlp import mlp
from largebatch.models.small import alexnet_bn_small, fmnist_net, resnet_small

__all__ = [
    "MODEL_NAMES",
    "OPTION_RULES",
    "ModelError",
    "build_model",
    "check_input",
    "check_options",
    "default_input_size",
    "model_options",
]


class ModelError(UserError, ValueError):
    """An unknown model, or options it cannot be built with, or data it cannot take; one line."""



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

# option -> (allowed?, what is allowed): the range; the type comes from the constructor's annotation
OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "in_channels": (lambda v: v >= 1, "an integer >= 1"),
    "image_size": (lambda v: v >= 1, "an integer >= 1"),
    "width": (lambda v: v >= 1, "an integer >= 1"),
    "hidden": (lambda v: v >= 1, "an integer >= 1"),
    "blocks": (lambda v: v >= 1, "an integer >= 1"),
    "depth": (lambda v: v >= 0, "an integer >= 0"),
    "groups": (lambda v: v in (1, 2), "1 or 2"),
    "dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "zero_init_residual": (lambda v: True, "true or false"),
}


def _entry(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}") from None


def _has_type(value: Any, annotation: Any) -> bool:
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True  # no annotation we know: the range rule decides


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse unknown options and values of the wrong type or range, naming the option."""
    allowed = model_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ModelError(f"model {name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}")
    hints = typing.get_type_hints(_entry(name).build)
    for option, value in options.items():
        ok, what = OPTION_RULES[option]
        if not _has_type(value, hints.get(option)) or not ok(value):
            raise ModelError(f"model.options.{option} must be {what} for {name}, got {value!r}")


def model_options(name: str) -> dict[str, object]:
    """The keyword options a model accepts, with their defaults."""
    params = inspect.signature(_entry(name).build).parameters
    return {k: p.default for k, p in params.items() if k != "num_classes"}


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build an untrained model by registry name.

    Every model takes ``in_channels`` (3 for the ImageNet models, 1 by default for the small
    ones); see :func:`model_options` for the rest. Unknown names, options or values out of range
    raise ModelError (a ValueError) before anything is built.
    """
    check_options(name, options)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _entry(name).build(num_classes, **options)


def default_input_size(name: str) -> int:
    """Side of the square input the model is designed for: 227 alexnet_bn, 224 alexnet and
    resnet50, 28 for the small ones (which also take 32)."""
    return _entry(name).input_size


def _first_layer_inputs(model: nn.Module) -> tuple[str, int] | None:
    """("channels", n) for a model whose first weighted layer is a convolution, ("features", n)
    for a linear one (after a flatten), None for anything else."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return "channels", module.in_channels
        if isinstance(module, nn.Linear):
            return "features", module.in_features
    return None


def check_input(model: nn.Module, name: str, input_shape: tuple[int, ...]) -> None:
    """Refuse data the model cannot take, in one line, before the first training step.

    The first layer's input channels (or features) are compared with the data's (C, H, W); then
    one zero image goes through the model in eval mode without gradients (no random numbers are
    drawn, no BatchNorm statistics change), which catches images too small for the network.
    """
    shape = " x ".join(str(s) for s in input_shape)
    first = _first_layer_inputs(model)
    if first is not None:
        kind, expected = first
        given = input_shape[0] if kind == "channels" else _product(input_shape)
        if given != expected:
            raise ModelError(
                f"model {name} takes {expected} input {kind} but the data's examples are {shape} "
                f"({given} {kind}); leave model.options.in_channels and image_size unset to follow the data"
            )
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    except RuntimeError as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"model {name} cannot take {shape} inputs: {first_line}") from None
    finally:
        model.train(was_training)


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
