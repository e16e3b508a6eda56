"""Batch-wise augmentation on the device: random crop with zero padding, and horizontal flip.

As the fastest CIFAR trainers do (airbench), a whole batch is augmented with a few tensor ops
instead of per-image Python: a batch of 8192 28x28 images takes a few tensor ops. The random draws are
made for the whole global batch from the step's generator and then sliced, so the image at a
given position of a global batch is augmented the same way whatever the rank, world size or
micro-batch split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from largebatch.data.base import DataError

__all__ = ["CropFlip", "CropFlipDraws", "crop_flip", "to_device"]


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor (indices, draws) on ``device`` without stopping the host: on a GPU it is
    pinned, then copied asynchronously (a copy from pageable memory waits for the GPU, and would
    cost the loop its lead on every batch). The caching host allocator keeps the pinned block
    until the copy has run."""
    device = torch.device(device)
    if device.type != "cuda" or t.device == device:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class CropFlipDraws:
    """Per-image offsets in [0, 2*pad] (a shift of offset - pad) and flip flags."""

    dy: Tensor
    dx: Tensor
    flip: Tensor

    def __getitem__(self, s: slice) -> CropFlipDraws:
        return CropFlipDraws(self.dy[s], self.dx[s], self.flip[s])

    def to(self, device: torch.device) -> CropFlipDraws:
        return CropFlipDraws(to_device(self.dy, device), to_device(self.dx, device), to_device(self.flip, device))


@dataclass(frozen=True)
class CropFlip:
    """Random translation by up to ``pad`` pixels (zero fill) and, if ``flip``, a mirror."""

    pad: int = 2
    flip: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pad, bool) or not isinstance(self.pad, int) or self.pad < 0:
            raise DataError(f"data.options.pad must be an integer >= 0, got {self.pad!r}")

    def draw(self, n: int, generator: torch.Generator) -> CropFlipDraws:
        """Draws for n images, in a fixed order (dy, dx, flip), on the CPU (the same numbers on
        every device; :meth:`CropFlipDraws.to` moves them without a host sync)."""
        dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
        if self.flip:
            flip = torch.randint(0, 2, (n,), generator=generator, dtype=torch.bool)
        else:
            flip = torch.zeros(n, dtype=torch.bool)
        return CropFlipDraws(dy, dx, flip)

    def __call__(self, x: Tensor, draws: CropFlipDraws) -> Tensor:
        return crop_flip(x, draws, self.pad)


def crop_flip(x: Tensor, draws: CropFlipDraws, pad: int) -> Tensor:
    """Apply crops and flips to x (N, C, H, W), any dtype, on x's device.

    Output image n is the window padded[n, :, dy:dy+H, dx:dx+W], mirrored when flipped. All
    (2*pad+1)^2 windows of every image are one strided view of the padded batch (no copy), and
    one advanced-indexing op picks each image's window; no host synchronisation."""
    n, c, h, w = x.shape
    d = draws.to(x.device)
    k = 2 * pad + 1
    padded = F.pad(x, (pad, pad, pad, pad)).contiguous()
    sn, sc, sh, sw = padded.stride()
    windows = padded.as_strided((n, k, k, c, h, w), (sn, sh, sw, sc, sh, sw))
    out = windows[torch.arange(n, device=x.device), d.dy, d.dx]
    return torch.where(d.flip[:, None, None, None], out.flip(3), out)
