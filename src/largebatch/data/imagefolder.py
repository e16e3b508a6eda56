"""ImageNet-layout folders (root/train/<class>/*.jpg, root/val/<class>/*.jpg) through torchvision.

Two ways to turn files into crops, chosen by ``decode``:

- ``"cpu"``: DataLoader worker processes decode with Pillow and crop, flip and resize each
  image; they hand back uint8 crops.
- ``"device"`` (``"gpu"`` where the device is CUDA): workers only read file bytes; JPEGs are
  decoded in batches on the training device (nvJPEG on a GPU) and cropped, resized and
  flipped there (:mod:`.batch_decode`). Files that are not complete JPEGs (PNG, truncated
  files), and JPEGs whose header shows the device decoder would get them wrong (CMYK, 12-bit,
  :func:`.batch_decode.device_decodable`), still go through the Pillow path in the workers, so
  they are read or refused as before.

Either way the float conversion and normalisation happen on the training device, and workers
ignore SIGTERM from anyone but the main process: a scheduler signals the whole process group,
and the main process, which checkpoints at the step boundary, must stay in charge (workers
still exit with it).

Training: a random-resized crop (scale ``crop_scale``, default 0.08-1, aspect 3/4-4/3, the
Inception recipe) and a random horizontal flip. Its randomness comes from one seed per example
drawn from the step's generator for the whole global batch, so it does not depend on rank, world
size, worker count, micro-batch split or decode path. Evaluation: resize of the short side to
``resize`` and a centre crop.

An image that cannot be read never kills a worker: the path comes back with the batch, and the
main process either raises :class:`DataError` naming it (``on_bad_image="fail"``) or (``"skip"``)
counts it; in training the sample is replaced by the next readable file in the listing
(deterministic), in evaluation it is left out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import InterpolationMode

from largebatch.data.base import Batch, DataError, DataSource
from largebatch.data.batch_decode import (
    crop_batch,
    decode_jpegs,
    device_decodable,
    device_decode_available,
    is_complete_jpeg,
    random_resized_crop_box,
    train_crop,
)
from largebatch.data.memory import Normalize
from largebatch.data.order import step_generator
from largebatch.imagenet_stats import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DECODE_CHOICES",
    "DEFAULT_CROP_SCALE",
    "MAX_REPLACEMENTS",
    "ImageFolderSource",
    "imagefolder",
    "random_resized_crop_box",
    "resolve_decode",
]

log = logging.getLogger("largebatch.data")
MAX_REPLACEMENTS = 32  # consecutive unreadable files tolerated when replacing one in "skip" mode
DECODE_CHOICES = ("auto", "cpu", "device", "gpu")
DEFAULT_CROP_SCALE = (0.08, 1.0)


class _Item(NamedTuple):
    """One image as a loader worker hands it over."""

    payload: Tensor  # the uint8 crop, or the file's bytes (1-D uint8) when encoded
    encoded: bool  # payload is a complete JPEG, left for the device to decode
    label: int  # -1 when no readable file was found
    seed: int | None  # the crop-and-flip seed (training), None in evaluation
    index: int  # index in the listing of the file actually used
    bad: list[tuple[str, str]]  # (path, error) of each unreadable file met on the way


class _MicroBatch(NamedTuple):
    """A micro-batch of items as the loader delivers it (:func:`_collate`)."""

    payloads: list[Tensor] | Tensor  # crops stacked into one tensor, or a list when any is JPEG bytes
    encoded: list[bool]
    labels: Tensor  # int64, -1 where no readable file was found
    seeds: list[int | None]
    indices: list[int]
    bad: list[tuple[str, str]]


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _ignore_sigterm_from_others(worker_id: int) -> None:
    """Loader workers ignore SIGTERM unless their main process sends it.

    timeout, Slurm and Kubernetes signal every process of the job; the main process handles
    that at its step boundary and needs its workers until then. Its own ``terminate()`` of a
    worker (the DataLoader's shutdown, multiprocessing's exit handler) must still work, so the
    signal is blocked and a thread reads each one with its sender: from the parent it ends the
    worker, from anyone else it is dropped. Workers also exit when the main process dies.
    Where sigwaitinfo is missing (macOS), torch's own worker signal handling stays."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)  # as torch's own worker handler: a non-zero status would be reported as a crash

    threading.Thread(target=watch, name="sigterm-from-parent", daemon=True).start()


@contextlib.contextmanager
def _workers_born_deaf_to_sigterm() -> Iterator[None]:
    """Start loader workers with SIGTERM already blocked (a forked child inherits the mask).

    Between a worker's fork and its ``worker_init_fn`` a signal to the whole process group would
    still kill it (under load that gap is long enough to hit). The main process restores its own
    mask at once, and a SIGTERM that came meanwhile is delivered to it then."""
    if not hasattr(signal, "sigwaitinfo"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _Images(Dataset):
    """Reads one image per item; never raises for an unreadable file.

    Items are ``(index, seed)`` for training (seed drives the crop and flip) and ``index`` for
    evaluation. With ``encoded``, complete JPEGs come back as their bytes, for decoding on the
    device; everything else as a finished uint8 crop from Pillow."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        size: int,
        resize: int,
        train: bool,
        skip: bool,
        scale: tuple[float, float],
        encoded: bool,
    ) -> None:
        self.samples = list(samples)
        self.size, self.resize, self.train, self.skip = size, resize, train, skip
        self.scale, self.encoded = scale, encoded

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, path: str, seed: int | None) -> Tensor:
        """The Pillow path: decode, then crop + flip (training) or resize + centre crop."""
        with Image.open(path) as img:
            img = img.convert("RGB")
        if seed is None:
            img = TF.center_crop(TF.resize(img, self.resize, InterpolationMode.BILINEAR), self.size)
        else:
            (top, left, h, w), flip = train_crop(img.width, img.height, seed, self.scale)
            img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR)
            if flip:
                img = TF.hflip(img)
        return TF.pil_to_tensor(img)

    def _read(self, path: str, seed: int | None, encoded: bool) -> tuple[Tensor, bool]:
        if encoded:
            with open(path, "rb") as f:
                data = f.read()
            if is_complete_jpeg(data) and device_decodable(data):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), True
        return self.pixels(path, seed), False

    def first_readable(self, index: int, seed: int | None, encoded: bool, tries: int) -> _Item:
        """The item at ``index``, or (skip mode) the next readable one within ``tries`` files."""
        bad: list[tuple[str, str]] = []
        for k in range(tries):
            j = (index + k) % len(self.samples)
            path, label = self.samples[j]
            try:
                payload, is_jpeg = self._read(path, seed, encoded)
                return _Item(payload, is_jpeg, label, seed, j, bad)
            except Exception as err:  # any decoder failure is reported, never fatal to the worker
                bad.append((path, _describe(err)))
        return _Item(torch.zeros(3, self.size, self.size, dtype=torch.uint8), False, -1, seed, index, bad)

    def __getitem__(self, item: tuple[int, int] | int) -> _Item:
        index, seed = item if isinstance(item, tuple) else (item, None)
        tries = MAX_REPLACEMENTS if (self.train and self.skip) else 1
        return self.first_readable(index, seed, self.encoded, tries)


def _collate(items: list[_Item]) -> _MicroBatch:
    """A micro-batch from its items. When every item is a finished crop they are stacked here, in
    the worker, so the loader's pin-memory thread pins the batch itself and the main thread copies it
    to the device asynchronously (stacked there, it would be one more copy, into pageable memory, and
    a copy to the GPU that waits). JPEG bytes stay a list: they are decoded on the device."""
    encoded = [it.encoded for it in items]
    payloads: list[Tensor] | Tensor = [it.payload for it in items]
    if not any(encoded):
        payloads = torch.stack(payloads)
    labels = torch.tensor([it.label for it in items], dtype=torch.int64)
    bad = [b for it in items for b in it.bad]
    return _MicroBatch(payloads, encoded, labels, [it.seed for it in items], [it.index for it in items], bad)


def _loader_error(root: str, err: Exception) -> Exception:
    """A loader failure as one line naming its cause: a worker killed from outside (memory, a
    signal), or the pin-memory thread's error, which torch re-raises here with its traceback in
    the message ("Caught X in pin memory thread ..."; the cause is the last line). Anything else
    (a bug) is left as it is."""
    text = str(err)
    if "DataLoader worker" in text:
        return DataError(f"image loader under {root} failed: {text.splitlines()[0]}")
    if "in pin memory thread" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        return DataError(f"image loader under {root} failed while pinning a batch in page-locked memory: "
                         f"{lines[-1].strip()}")
    return err


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

    ``decode`` is the path in use ("cpu" or "device"); ``skipped`` counts replaced or
    left-out samples so far; ``bad_images`` maps each unreadable path to its error."""

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
        crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
        decode: str = "cpu",
    ) -> None:
        self.root = root
        self.device = torch.device(device)
        self.seed = int(seed)
        self.augment = augment
        self.skip = on_bad_image == "skip"
        self.image_size, self.resize, self.crop_scale, self.decode = image_size, resize, crop_scale, decode
        classes, self.class_to_idx = _classes(os.path.join(root, "train"))
        self.train_samples = _listing(os.path.join(root, "train"), self.class_to_idx, every_class=True)
        val_dir = os.path.join(root, "val")
        # without val/ there is nothing to evaluate; the trainer refuses that only when it evaluates
        self.eval_unavailable = None if os.path.isdir(val_dir) else f"imagefolder: no directory {val_dir}"
        self.eval_samples = [] if self.eval_unavailable else _listing(val_dir, self.class_to_idx)
        self.classes = classes
        self.num_train, self.num_eval, self.num_classes = len(self.train_samples), len(self.eval_samples), len(classes)
        self.input_shape = (3, image_size, image_size)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD, self.device)
        self.skipped = 0
        self.bad_images: dict[str, str] = {}
        pin = self.device.type == "cuda"
        self._loaders: dict[str, tuple[DataLoader, _ListSampler, _Images]] = {}

        def make(name: str, samples: list, train: bool) -> None:
            sampler = _ListSampler()
            data = _Images(samples, image_size, resize, train, self.skip, crop_scale, encoded=decode == "device")
            extra = {"prefetch_factor": prefetch_factor, "persistent_workers": True} if workers > 0 else {}
            loader = DataLoader(
                data, batch_sampler=sampler, num_workers=workers, collate_fn=_collate, pin_memory=pin,
                worker_init_fn=_ignore_sigterm_from_others, **extra,
            )
            self._loaders[name] = (loader, sampler, data)

        make("train", self.train_samples, augment)
        if self.eval_samples:
            make("eval", self.eval_samples, False)

    def _decode_on_device(self, images: _Images, raw: _MicroBatch) -> Tensor:
        """The micro-batch's uint8 crops on the device: JPEG bytes decoded and cropped there,
        Pillow crops copied over. A JPEG the device cannot decode gets a second chance with
        Pillow; if that fails too it joins ``bad`` (and, in training with "skip", is replaced
        by the next readable file, as a worker would have done)."""
        payloads, seeds, indices, bad = raw.payloads, raw.seeds, raw.indices, raw.bad
        jpeg_slots = [i for i, e in enumerate(raw.encoded) if e]
        decoded = decode_jpegs([payloads[i] for i in jpeg_slots], self.device)
        ok_slots, ok_images = [], []
        for i, img in zip(jpeg_slots, decoded, strict=True):
            if isinstance(img, Tensor):
                ok_slots.append(i)
                ok_images.append(img)
                continue
            path = images.samples[indices[i]][0]
            try:  # not every valid JPEG suits every decoder (nvJPEG and CMYK, for one)
                payloads[i] = images.pixels(path, seeds[i])
                continue
            except Exception as err:
                bad.append((path, _describe(err)))
            tries = MAX_REPLACEMENTS if (images.train and self.skip) else 0
            replacement = images.first_readable(indices[i] + 1, seeds[i], False, tries)
            payloads[i] = replacement.payload
            bad.extend(replacement.bad)
            raw.labels[i] = replacement.label if tries else -1
        if ok_images:
            if images.train:
                crops = [train_crop(img.shape[2], img.shape[1], seeds[i], self.crop_scale)
                         for i, img in zip(ok_slots, ok_images, strict=True)]
                cropped = crop_batch(ok_images, self.image_size, crops=crops)
            else:
                cropped = crop_batch(ok_images, self.image_size, resize=self.resize)
            if len(ok_slots) == len(payloads):  # the usual case: no copy, no index upload
                return cropped
            for i, crop in zip(ok_slots, cropped.unbind(0), strict=True):
                payloads[i] = crop
        # Pillow crops (other formats, fallbacks) join in their slots; no index tensor, no sync
        return torch.stack([p.to(self.device, non_blocking=True) for p in payloads])

    def _run(self, name: str, batches: list[list]) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """Feed ``batches`` through a loader; yield (uint8 x on the device, y, keep-mask or None)."""
        if not batches:  # nothing to read (no val/, or a rank past the data): start no workers
            return
        loader, sampler, images = self._loaders[name]
        sampler.batches = batches
        with _workers_born_deaf_to_sigterm():  # persistent workers start here, on the first call
            it = iter(loader)
        while True:
            try:
                raw = next(it)
            except StopIteration:
                return
            except Exception as err:
                raise _loader_error(self.root, err) from None
            bad, y = raw.bad, raw.labels
            if any(raw.encoded):
                x = self._decode_on_device(images, raw)
            else:  # stacked (and pinned) by the loader
                x = raw.payloads.to(self.device, non_blocking=True)
            keep = None
            if bad:
                if not self.skip:
                    path, msg = bad[0]
                    raise DataError(f"unreadable image {path} ({msg}); pass --set data.options.on_bad_image=skip "
                                    "to replace such files with the next readable one")
                for path, msg in bad:
                    if path not in self.bad_images:
                        log.warning("skipping unreadable image %s (%s)", path, msg)
                    self.bad_images[path] = msg
                self.skipped += len(bad)
                if bool((y < 0).any()):
                    if name == "train":
                        raise DataError(f"more than {MAX_REPLACEMENTS} unreadable images in a row from {bad[0][0]}")
                    keep = (y >= 0).to(self.device)
            yield x, y.to(self.device, non_blocking=True), keep

    def _begin_step(self, epoch: int, step: int, global_batch: int) -> Tensor | None:
        """One crop-and-flip seed per example of the global batch (None without augmentation)."""
        if not self.augment:
            return None
        return torch.randint(0, 2**62, (global_batch,), generator=step_generator(self.seed, epoch, step))

    def train_batches(
        self, epoch: int, global_batch: int, micro_batch: int, rank: int, world: int, start_step: int = 0
    ) -> Iterator[list[Batch]]:
        """The base class's order, with the epoch's micro-batches queued at once so that the
        workers read ahead across step boundaries."""
        requests: list[list] = []
        per_step = 0
        for seeds, micro in self._train_steps(epoch, global_batch, micro_batch, rank, world, start_step):
            per_step = len(micro)
            for indices, positions in micro:
                idx = indices.tolist()
                requests.append(idx if seeds is None else list(zip(idx, seeds[positions].tolist(), strict=True)))
        step: list[Batch] = []
        for x, y, _ in self._run("train", requests):
            step.append((self.normalize(x), y))
            if len(step) == per_step:
                yield step
                step = []

    def eval_batches(self, batch: int, rank: int, world: int) -> Iterator[Batch]:
        """The base class's shard and batches, queued at once; unreadable images left out (skip)."""
        requests = [list(range(a, b)) for a, b in self._eval_ranges(batch, rank, world)]
        for x, y, keep in self._run("eval", requests):
            if keep is not None:
                x, y = x[keep], y[keep]
                if not len(y):
                    continue
            yield self.normalize(x), y


def _classes(train_dir: str) -> tuple[list[str], dict[str, int]]:
    if not os.path.isdir(train_dir):
        raise DataError(f"imagefolder: no training directory {train_dir}")
    try:
        return find_classes(train_dir)
    except FileNotFoundError:
        raise DataError(f"imagefolder: no class folders in {train_dir}") from None


def _listing(split_dir: str, class_to_idx: dict[str, int], every_class: bool = False) -> list[tuple[str, int]]:
    """(path, class) of every image under split_dir; with ``every_class`` (train/), a class
    folder without images is refused, as it would be a class the model can never learn."""
    if not os.path.isdir(split_dir):
        raise DataError(f"imagefolder: no directory {split_dir}")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    unknown = [c for c in found if c not in class_to_idx]
    if unknown:
        raise DataError(f"imagefolder: class folder {os.path.join(split_dir, unknown[0])} has no match in train/")
    present = {c: i for c, i in class_to_idx.items() if c in found}
    if not present:  # torchvision's make_dataset raises a bare ValueError for this
        raise DataError(f"imagefolder: no class folders in {split_dir}")
    samples = make_dataset(split_dir, present, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(f"imagefolder: no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}")
    if every_class:
        counted = {label for _, label in samples}
        empty = [c for c, i in present.items() if i not in counted]
        if empty:
            raise DataError(
                f"imagefolder: class folder {os.path.join(split_dir, empty[0])} holds no images "
                f"({', '.join(IMG_EXTENSIONS)}); remove it or add images"
            )
    return samples


def _crop_scale(value: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not 0 < lo <= hi <= 1:
        raise DataError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {value!r}")
    return lo, hi


def resolve_decode(decode: object, device: torch.device) -> str:
    """"cpu" or "device" for the ``decode`` option: "auto" is "device" on a CUDA device whose
    torchvision decodes JPEGs there, else "cpu"; "gpu" insists on that."""
    if decode not in DECODE_CHOICES:
        raise DataError(f"decode must be one of {', '.join(DECODE_CHOICES)}, got {decode!r}")
    if decode == "gpu" and not device_decode_available(device):
        raise DataError(
            f"decode='gpu' needs a CUDA device with torchvision's GPU JPEG decoder; this run's device is "
            f"{device} (use decode='auto', 'cpu' or 'device')"
        )
    if decode == "auto":
        return "device" if device_decode_available(device) else "cpu"
    return "device" if decode == "gpu" else str(decode)


def imagefolder(
    root: str | None,
    device: torch.device,
    seed: int,
    augment: bool = True,
    image_size: int | None = None,
    resize: int | None = None,
    workers: int | None = None,
    on_bad_image: str = "fail",
    prefetch_factor: int = 2,
    crop_scale: tuple[float, float] | list[float] = DEFAULT_CROP_SCALE,
    decode: str = "auto",
) -> ImageFolderSource:
    """ImageNet-layout folders under ``root``. ``image_size``: the square crop (default: the
    model's input size when the dataset is built for a model, else 224); ``resize``:
    evaluation's short side before the centre crop (default image_size x 256/224); ``workers``:
    loader processes (default: the CPU count, at most 8); ``on_bad_image``: "fail" or "skip";
    ``crop_scale``: the training crop's share of the image area, [low, high] (0.08-1);
    ``decode``: "auto", "cpu" (Pillow in workers), "device" (batches decoded on the run's
    device) or "gpu" (the same, refused unless the device is a GPU that can)."""
    if root is None:
        raise DataError("imagefolder needs a root directory holding train/ and val/ (val/ only when evaluating)")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"imagefolder: directory not found: {root}")
    if on_bad_image not in ("fail", "skip"):
        raise DataError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
    image_size = 224 if image_size is None else image_size
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    resize = round(image_size * 256 / 224) if resize is None else resize
    if not isinstance(resize, int) or resize < image_size:
        raise DataError(f"resize must be an integer >= image_size {image_size}, got {resize!r}")
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be a non-negative integer, got {workers!r}")
    if not isinstance(prefetch_factor, int) or isinstance(prefetch_factor, bool) or prefetch_factor < 1:
        raise DataError(f"prefetch_factor must be a positive integer (batches read ahead per worker), "
                        f"got {prefetch_factor!r}")
    scale = _crop_scale(crop_scale)
    mode = resolve_decode(decode, torch.device(device))
    return ImageFolderSource(
        root, device, seed, augment, image_size, resize, workers, on_bad_image, prefetch_factor, scale, mode
    )
