"""Datasets held whole on the training device as uint8, normalised and augmented per batch.

Keeping Fashion-MNIST (47 MB as uint8) resident removes the input pipeline altogether: a batch
is one index_select, one gather for crop and flip, and one normalisation, all on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from largebatch.data.augment import CropFlip, CropFlipDraws, to_device
from largebatch.data.base import Batch, DataSource
from largebatch.data.order import step_generator

__all__ = ["InMemorySource", "Normalize"]


class Normalize:
    """uint8 -> float32 (x - mean) / std, per channel; mean and std on the 0..1 scale."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean {mean} and std {std} must have one positive std per channel")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._shift = torch.tensor([255.0 * m for m in mean], device=device).view(1, -1, 1, 1)
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return x.to(torch.float32, copy=True).sub_(self._shift).mul_(self._scale)


class InMemorySource(DataSource):
    """Train and eval sets as uint8 (N, C, H, W) tensors with int64 labels, on ``device``."""

    def __init__(
        self,
        train_set: tuple[Tensor, Tensor],
        eval_set: tuple[Tensor, Tensor],
        num_classes: int,
        normalize: Normalize,
        device: torch.device,
        seed: int,
        augment: CropFlip | None,
    ) -> None:
        self.device = torch.device(device)
        self.train_x, self.train_y = (t.to(self.device) for t in train_set)
        self.eval_x, self.eval_y = (t.to(self.device) for t in eval_set)
        self.num_train = int(self.train_y.shape[0])
        self.num_eval = int(self.eval_y.shape[0])
        self.num_classes = int(num_classes)
        self.input_shape = tuple(self.train_x.shape[1:])
        self.normalize = normalize
        self.seed = int(seed)
        self.augment = augment

    def _gather(self, x: Tensor, y: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
        idx = to_device(indices, self.device)  # pinned and asynchronous: no host sync per batch
        return x.index_select(0, idx), y.index_select(0, idx)

    def _begin_step(self, epoch: int, step: int, global_batch: int) -> CropFlipDraws | None:
        if self.augment is None:
            return None
        # drawn on the CPU for the whole global batch, moved once per step (not per micro-batch)
        return self.augment.draw(global_batch, step_generator(self.seed, epoch, step)).to(self.device)

    def _train_micro(self, indices: Tensor, positions: slice, state: object) -> Batch:
        x, y = self._gather(self.train_x, self.train_y, indices)
        if isinstance(state, CropFlipDraws) and self.augment is not None:
            x = self.augment(x, state[positions])
        return self.normalize(x), y

    def _eval_range(self, start: int, stop: int) -> Batch:
        return self.normalize(self.eval_x[start:stop]), self.eval_y[start:stop]
