"""Datasets by name, all delivering batches in one deterministic, rank-sharded, resumable order.

See :mod:`largebatch.data.order` for the ordering contract and docs/models_and_data.md for the
data paths. Depends on torch, torchvision, Pillow and the model registry (for input sizes);
never on the trainer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from largebatch.data.base import Batch, DataError, DataSource
from largebatch.data.fashion_mnist import fashion_mnist
from largebatch.data.imagefolder import imagefolder
from largebatch.data.synthetic import synthetic
from largebatch.models.registry import default_input_size, model_options

__all__ = ["DATASET_NAMES", "Batch", "DataError", "DataSource", "build_dataset", "dataset_options", "model_defaults"]

_BUILDERS: dict[str, Callable[..., DataSource]] = {
    "fashion_mnist": fashion_mnist,
    "imagefolder": imagefolder,
    "synthetic": synthetic,
}
DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)
_COMMON = ("root", "device", "seed", "augment")  # every builder's positional arguments


def dataset_options(name: str) -> dict[str, object]:
    """The options a dataset takes beyond root, device, seed and augment, with defaults."""
    if name not in _BUILDERS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    params = inspect.signature(_BUILDERS[name]).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def model_defaults(name: str, model: str) -> dict[str, object]:
    """Options of dataset ``name`` that follow from the model it feeds: imagefolder's crop is the
    model's input size; synthetic images have the model's input shape (its default channels)."""
    if name == "imagefolder":
        return {"image_size": default_input_size(model)}
    if name == "synthetic":
        size = default_input_size(model)
        channels = model_options(model).get("in_channels", 3)
        return {"shape": (channels if isinstance(channels, int) else 3, size, size)}
    return {}


def build_dataset(
    name: str,
    *,
    root: str | None,
    device: torch.device | str,
    seed: int,
    augment: bool = True,
    model: str | None = None,
    **options,
) -> DataSource:
    """Open a dataset by name. ``root`` None means the default place (fashion_mnist) or is an
    error (imagefolder); synthetic ignores it. ``model`` (a registry name) sizes the images
    where the user did not (:func:`model_defaults`). Unknown names or options raise DataError."""
    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"dataset {name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}")
    if not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    if model is not None:
        options = {**model_defaults(name, model), **options}
    return _BUILDERS[name](root, torch.device(device), seed, augment, **options)
