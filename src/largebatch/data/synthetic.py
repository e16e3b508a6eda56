"""Synthetic data of any shape (a model's input shape when built for one), for throughput measurements.

A pool of random uint8 images and labels lives on the device; example i of the (virtual)
training set is pool item i mod pool_size. Batches follow the same order, sharding,
augmentation and normalisation as the real in-memory datasets, so what is timed is the real
batch path minus file reading; a model can only memorise it, not learn it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from largebatch.data.augment import CropFlip
from largebatch.data.base import DataError
from largebatch.data.memory import InMemorySource, Normalize
from largebatch.data.order import mix_seed
from largebatch.imagenet_stats import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DEFAULT_EVAL", "DEFAULT_TRAIN", "SyntheticSource", "synthetic"]

# a modest default: 8 steps of 8192 per epoch, so a first run ends in minutes, not hours;
# num_train=IMAGENET_TRAIN (largebatch.imagenet_stats) gives ImageNet-length epochs
DEFAULT_TRAIN = 65_536
DEFAULT_EVAL = 10_000


class SyntheticSource(InMemorySource):
    """An in-memory source whose examples repeat a small pool."""

    def __init__(self, *args, num_train: int, num_eval: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pool_size = int(self.train_y.shape[0])
        self.num_train, self.num_eval = int(num_train), int(num_eval)

    def _gather(self, x: Tensor, y: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        return super()._gather(x, y, indices % self.pool_size)

    def _eval_range(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        x, y = self._gather(self.eval_x, self.eval_y, torch.arange(start, stop))
        return self.normalize(x), y


def synthetic(
    root: str | None,
    device: torch.device,
    seed: int,
    augment: bool = False,
    shape: tuple[int, int, int] | list[int] = (3, 224, 224),
    num_classes: int = 1000,
    num_train: int = DEFAULT_TRAIN,
    num_eval: int = DEFAULT_EVAL,
    pool_size: int = 256,
    pad: int = 4,
    flip: bool = True,
) -> SyntheticSource:
    """Random images of ``shape`` (C, H, W; the model's input shape when built for a model, else
    3x224x224); ``root`` is ignored. 65,536 train / 10,000 eval examples and 1000 classes by
    default, repeating a pool of ``pool_size``."""
    if (not isinstance(shape, (list, tuple)) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)):
        raise DataError(f"synthetic shape must be (C, H, W) of positive integers, got {shape!r}")
    shape = tuple(shape)
    for name, value in (("num_classes", num_classes), ("num_train", num_train), ("pool_size", pool_size)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"synthetic {name} must be a positive integer, got {value!r}")
    if not isinstance(num_eval, int) or num_eval < 0:
        raise DataError(f"synthetic num_eval must be a non-negative integer, got {num_eval!r}")
    g = torch.Generator().manual_seed(mix_seed(seed, 0x53594E))
    x = torch.randint(0, 256, (pool_size, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (pool_size,), generator=g)
    c = shape[0]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,) * c, (0.5,) * c)
    dev = torch.device(device)
    aug = CropFlip(pad=pad, flip=flip) if augment else None
    return SyntheticSource(
        (x, y), (x, y), num_classes, Normalize(mean, std, dev), dev, seed, aug, num_train=num_train, num_eval=num_eval
    )
