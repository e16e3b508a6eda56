"""ImageNet-1k (ILSVRC-2012) figures several layers use: split sizes and the per-channel mean and
standard deviation that images are normalised with.

Kept free of torch so that the planner's command line (whose --dataset-size defaults to ImageNet)
builds without it. Sizes: the classification task's training and validation sets (Russakovsky et
al., "ImageNet Large Scale Visual Recognition Challenge", IJCV 2015; docs/paper.md). Channel
statistics on the 0..1 scale, RGB: the values torchvision's ImageNet models are trained with.
"""

from __future__ import annotations

__all__ = ["IMAGENET_EVAL", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_TRAIN"]

IMAGENET_TRAIN = 1_281_167
IMAGENET_EVAL = 50_000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
