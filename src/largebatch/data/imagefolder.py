"""ImageNet-layout folders (root/train/<class>/*.jpg, root/val/<class>/*.jpg) through torchvision.

Decoding and per-image transforms run in DataLoader worker processes (persistent across epochs,
pinned memory when training on CUDA); workers hand back uint8 crops, and the normalisation to
float happens on the training device, which moves a quarter of the bytes.

Training: a random-resized crop (scale 0.08-1, aspect 3/4-4/3, the Inception recipe) and a
random horizontal flip. Its randomness comes from one seed per example drawn from the step's
generator for the whole global batch, so it does not depend on rank, world size, worker count
or micro-batch split. Evaluation: resize of the short side to ``resize`` and a centre crop.

An image that cannot be read never kills a worker: the worker reports its path back with the
batch, and the main process either raises :class:`DataError` naming it (``on_bad_image="fail"``)
or (``"skip"``) counts it; in training the sample is replaced by the next readable file in the
listing (deterministic), in evaluation it is left out.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import InterpolationMode

from largebatch.data.base import Batch, DataError, DataSource
from largebatch.data.memory import Normalize
from largebatch.data.order import epoch_permutation, eval_shard, plan_steps, step_generator
from largebatch.data.synthetic import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ImageFolderSource", "imagefolder", "random_resized_crop_box"]

log = logging.getLogger("largebatch.data")
MAX_REPLACEMENTS = 32  # consecutive unreadable files tolerated when replacing one in "skip" mode


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a uniform fraction in ``scale`` of the area with a
    log-uniform aspect ratio in ``ratio``; 10 tries, then the largest centred crop whose aspect
    lies in ``ratio``. Draws only from ``rng``, so a seed fixes the crop."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _Images(Dataset):
    """Decodes and transforms one image per item; never raises for an unreadable file.

    Items are ``(index, seed)`` for training (seed drives the crop and flip) and ``index`` for
    evaluation. Returns (uint8 CHW tensor, label, list of (path, error) for unreadable files)."""

    def __init__(self, samples: Sequence[tuple[str, int]], size: int, resize: int, train: bool, skip: bool) -> None:
        self.samples = list(samples)
        self.size, self.resize, self.train, self.skip = size, resize, train, skip

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str, seed: int | None) -> Tensor:
        with Image.open(path) as img:
            img = img.convert("RGB")
        if seed is None:
            img = TF.center_crop(TF.resize(img, self.resize, InterpolationMode.BILINEAR), self.size)
        else:
            rng = random.Random(seed)
            top, left, h, w = random_resized_crop_box(img.width, img.height, rng)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR)
            if rng.random() < 0.5:
                img = TF.hflip(img)
        return TF.pil_to_tensor(img)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[Tensor, int, list[tuple[str, str]]]:
        index, seed = item if isinstance(item, tuple) else (item, None)
        bad: list[tuple[str, str]] = []
        tries = MAX_REPLACEMENTS if (self.train and self.skip) else 1
        for k in range(tries):
            path, label = self.samples[(index + k) % len(self.samples)]
            try:
                return self._load(path, seed), label, bad
            except Exception as err:  # any decoder failure is reported, never fatal to the worker
                bad.append((path, f"{type(err).__name__}: {err}".splitlines()[0]))
        return torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1, bad


def _collate(items: list[tuple[Tensor, int, list]]) -> tuple[Tensor, Tensor, list[tuple[str, str]]]:
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items], dtype=torch.int64)
    bad = [b for it in items for b in it[2]]
    return x, y, bad


class _ListSampler(Sampler):
    """Yields the micro-batches currently assigned to it. The DataLoader calls iter() on it at
    each new pass, so one persistent-worker loader serves every epoch and resume point."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __iter__(self) -> Iterator[list]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ImageFolderSource(DataSource):
    """train/ and val/ folders, one sub-folder per class (ImageNet's layout).

    ``skipped`` counts replaced or left-out samples so far; ``bad_images`` maps each unreadable
    path to its error."""

    def __init__(
        self,
        root: str,
        device: torch.device,
        seed: int,
        augment: bool,
        image_size: int,
        resize: int,
        workers: int,
        on_bad_image: str,
        prefetch_factor: int,
    ) -> None:
        self.root = root
        self.device = torch.device(device)
        self.seed = int(seed)
        self.augment = augment
        self.skip = on_bad_image == "skip"
        classes, self.class_to_idx = _classes(os.path.join(root, "train"))
        self.train_samples = _listing(os.path.join(root, "train"), self.class_to_idx)
        self.eval_samples = _listing(os.path.join(root, "val"), self.class_to_idx)
        self.classes = classes
        self.num_train, self.num_eval, self.num_classes = len(self.train_samples), len(self.eval_samples), len(classes)
        self.input_shape = (3, image_size, image_size)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD, self.device)
        self.skipped = 0
        self.bad_images: dict[str, str] = {}
        pin = self.device.type == "cuda"
        self._loaders: dict[str, tuple[DataLoader, _ListSampler]] = {}

        def make(name: str, samples: list, train: bool) -> None:
            sampler = _ListSampler()
            data = _Images(samples, image_size, resize, train=train, skip=self.skip)
            extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if workers > 0 else {}
            loader = DataLoader(
                data, batch_sampler=sampler, num_workers=workers, collate_fn=_collate, pin_memory=pin, **extra
            )
            self._loaders[name] = (loader, sampler)

        make("train", self.train_samples, augment)
        make("eval", self.eval_samples, False)

    def _run(self, name: str, batches: list[list]) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Feed ``batches`` through a loader; yield (x on device normalised, y, keep-mask or None)."""
        loader, sampler = self._loaders[name]
        sampler.batches = batches
        it = iter(loader)
        while True:
            try:
                x, y, bad = next(it)
            except StopIteration:
                return
            except RuntimeError as err:  # a worker killed from outside (memory, signal)
                if "DataLoader worker" not in str(err):
                    raise
                raise DataError(f"image loader under {self.root} failed: {str(err).splitlines()[0]}") from None
            keep = None
            if bad:
                if not self.skip:
                    path, msg = bad[0]
                    raise DataError(f"unreadable image {path} ({msg}); use on_bad_image='skip' to replace such files")
                for path, msg in bad:
                    if path not in self.bad_images:
                        log.warning("skipping unreadable image %s (%s)", path, msg)
                    self.bad_images[path] = msg
                self.skipped += len(bad)
                if bool((y < 0).any()):
                    if name == "train":
                        raise DataError(f"more than {MAX_REPLACEMENTS} unreadable images in a row from {bad[0][0]}")
                    keep = y >= 0
            yield x, y, keep

    def _to_device(self, x: Tensor, y: Tensor) -> Batch:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return self.normalize(x), y

    def train_batches(
        self, epoch: int, global_batch: int, micro_batch: int, rank: int, world: int, start_step: int = 0
    ) -> Iterator[list[Batch]]:
        plan, steps = plan_steps(self.num_train, global_batch, micro_batch, rank, world, start_step)
        perm = epoch_permutation(self.num_train, self.seed, epoch)
        batches: list[list] = []
        for step in range(start_step, steps):
            base = step * global_batch
            seeds = None
            if self.augment:
                seeds = torch.randint(0, 2**62, (global_batch,), generator=step_generator(self.seed, epoch, step))
            for a, b in plan.micro_positions():
                idx = perm[base + a : base + b].tolist()
                if seeds is None:
                    batches.append(idx)
                else:
                    batches.append(list(zip(idx, seeds[a:b].tolist(), strict=True)))
        micro: list[Batch] = []
        for x, y, _ in self._run("train", batches):
            micro.append(self._to_device(x, y))
            if len(micro) == plan.accumulation:
                yield micro
                micro = []

    def eval_batches(self, batch: int, rank: int, world: int) -> Iterator[Batch]:
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"eval batch must be a positive integer, got {batch!r}")
        start, stop = eval_shard(self.num_eval, rank, world)
        batches = [list(range(a, min(a + batch, stop))) for a in range(start, stop, batch)]
        for x, y, keep in self._run("eval", batches):
            if keep is not None:
                x, y = x[keep], y[keep]
                if not len(y):
                    continue
            yield self._to_device(x, y)


def _classes(train_dir: str) -> tuple[list[str], dict[str, int]]:
    if not os.path.isdir(train_dir):
        raise DataError(f"imagefolder: no training directory {train_dir}")
    try:
        return find_classes(train_dir)
    except FileNotFoundError:
        raise DataError(f"imagefolder: no class folders in {train_dir}") from None


def _listing(split_dir: str, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    if not os.path.isdir(split_dir):
        raise DataError(f"imagefolder: no directory {split_dir}")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    unknown = [c for c in found if c not in class_to_idx]
    if unknown:
        raise DataError(f"imagefolder: class folder {os.path.join(split_dir, unknown[0])} has no match in train/")
    present = {c: i for c, i in class_to_idx.items() if c in found}
    samples = make_dataset(split_dir, present, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(f"imagefolder: no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    return samples


def imagefolder(
    root: str | None,
    device: torch.device,
    seed: int,
    augment: bool = True,
    image_size: int = 224,
    resize: int | None = None,
    workers: int | None = None,
    on_bad_image: str = "fail",
    prefetch_factor: int = 2,
) -> ImageFolderSource:
    """ImageNet-layout folders under ``root``. ``image_size``: the square crop (224; 227 for
    alexnet_bn); ``resize``: evaluation's short side before the centre crop (default
    image_size x 256/224); ``workers``: loader processes (default: the CPU count, at most 8);
    ``on_bad_image``: "fail" or "skip"."""
    if root is None:
        raise DataError("imagefolder needs a root directory holding train/ and val/")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"imagefolder: directory not found: {root}")
    if on_bad_image not in ("fail", "skip"):
        raise DataError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    resize = round(image_size * 256 / 224) if resize is None else resize
    if not isinstance(resize, int) or resize < image_size:
        raise DataError(f"resize must be an integer >= image_size {image_size}, got {resize!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be a non-negative integer, got {workers!r}")
    return ImageFolderSource(root, device, seed, augment, image_size, resize, workers, on_bad_image, prefetch_factor)
