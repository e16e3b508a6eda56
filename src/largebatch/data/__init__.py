"""Datasets by name, all delivering batches in one deterministic, rank-sharded, resumable order.

See :mod:`largebatch.data.order` for the ordering contract and docs/models_and_data.md for the
data paths. Depends on torch, torchvision and Pillow; never on the trainer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from largebatch.data.base import Batch, DataError, DataSource
from largebatch.data.fashion_mnist import fashion_mnist
from largebatch.data.imagefolder import imagefolder
from largebatch.data.synthetic import synthetic

__all__ = ["DATASET_NAMES", "Batch", "DataError", "DataSource", "build_dataset", "dataset_options"]

_BUILDERS: dict[str, Callable[..., DataSource]] = {
    "fashion_mnist": fashion_mnist,
    "imagefolder": imagefolder,
    "synthetic": synthetic,
}
DATASET_NAMES: tuple[str, ...] = tuple(_BUILDERS)
_COMMON = ("root", "device", "seed", "augment")


def dataset_options(name: str) -> dict[str, object]:
    """The options a dataset takes beyond root, device, seed and augment, with defaults."""
    if name not in _BUILDERS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    params = inspect.signature(_BUILDERS[name]).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def build_dataset(
    name: str, *, root: str | None, device: torch.device | str, seed: int, augment: bool = True, **options
) -> DataSource:
    """Open a dataset by name. ``root`` None means the default place (fashion_mnist) or is an
    error (imagefolder); synthetic ignores it. Unknown names or options raise DataError."""
    allowed = dataset_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"dataset {name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}")
    if not isinstance(seed, int):
        raise DataError(f"seed must be an integer, got {seed!r}")
    return _BUILDERS[name](root, torch.device(device), seed, augment, **options)
