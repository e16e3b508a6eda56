"""JPEG bytes -> augmented uint8 crops, decoded and resampled in batches on the training device.

With nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``) the CPU only reads files: the
decode, crop, resize and flip run on the GPU, so a compiled model is not starved by a few
loader processes. The same functions run on the CPU with torchvision's libjpeg decoder, which is
how their logic is tested on machines without a GPU.

Every image is processed on its own (crop boxes differ in size), so an image's pixels do not
depend on which batch it travels in: rank, world size and micro-batch split cannot change them.
The crop and flip come from :func:`train_crop`, the same draws as the PIL path.
"""

from __future__ import annotations

import functools
import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

__all__ = [
    "Crop",
    "centre_crop_plan",
    "crop_batch",
    "decode_jpegs",
    "device_decodable",
    "device_decode_available",
    "is_complete_jpeg",
    "random_resized_crop_box",
    "train_crop",
]

JPEG_START = b"\xff\xd8\xff"  # SOI marker followed by the first segment's marker
JPEG_END = b"\xff\xd9"  # EOI


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


Crop = tuple[tuple[int, int, int, int], bool]  # ((top, left, h, w), flip) in source pixels


def train_crop(width: int, height: int, seed: int, scale: tuple[float, float]) -> Crop:
    """The training crop box and flip of one image from its per-example seed: the box first,
    then one draw for the flip. Both image paths (PIL in workers, batch decode) call this."""
    rng = random.Random(seed)
    box = random_resized_crop_box(width, height, rng, scale)
    return box, rng.random() < 0.5


def centre_crop_plan(width: int, height: int, size: int, resize: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((new_h, new_w), (top, left)): evaluation's resize of the short side to ``resize`` and
    the offset of the centred ``size`` crop, with torchvision's rounding (long side truncated,
    offset rounded)."""
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_h, new_w = resize, int(resize * width / height)
    return (new_h, new_w), (round((new_h - size) / 2.0), round((new_w - size) / 2.0))


def is_complete_jpeg(data: bytes | memoryview) -> bool:
    """True when the bytes start and end with JPEG's markers. Anything else (PNG, a truncated or
    foreign file) is left to the per-image PIL path, which reports it as it always has."""
    return len(data) > 4 and bytes(data[:3]) == JPEG_START and bytes(data[-2:]) == JPEG_END


# Frame headers (SOFn) nvJPEG decodes: Huffman-coded baseline, extended and progressive. The
# others (lossless, arithmetic-coded, hierarchical) go to Pillow. Markers C4, C8 and CC share
# the SOF range but are not frame headers.
_DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_NOT_FRAMES = frozenset({0xC4, 0xC8, 0xCC})


def device_decodable(data: bytes | memoryview) -> bool:
    """Whether the device decoder gives the right RGB pixels for this JPEG, read from its header.

    Kept for the device: 8-bit Huffman JPEGs (baseline, extended, progressive) with one (grey)
    or three (YCbCr) components, what nvJPEG documents. Sent to Pillow, which decodes them as
    before: four components (CMYK, YCCK: Photoshop's files), three that Adobe's APP14 marks as
    stored in RGB (transform 0; a decoder assuming YCbCr gives wrong colours, not an error),
    12-bit and arithmetic-coded files. Routed conservatively: not yet checked on a GPU."""
    n, i, adobe_transform = len(data), 2, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length, body = (data[i + 2] << 8) | data[i + 3], i + 4
        if marker == 0xEE and length >= 14 and bytes(data[body : body + 5]) == b"Adobe":
            adobe_transform = data[body + 11]
        elif 0xC0 <= marker <= 0xCF and marker not in _NOT_FRAMES:
            if marker not in _DEVICE_FRAMES or body + 6 > n:
                return False
            precision, components = data[body], data[body + 5]
            if precision != 8 or components not in (1, 3):
                return False
            return not (components == 3 and adobe_transform == 0)
        elif marker == 0xDA:  # a scan before any frame header
            return False
        i += 2 + length
    return False


_decode_streams: dict[torch.device, torch.cuda.Stream] = {}


def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _decode_streams:
        _decode_streams[device] = torch.cuda.Stream(device=device)
    return _decode_streams[device]


def decode_jpegs(data: list[Tensor], device: torch.device) -> list[Tensor | Exception]:
    """Decode 1-D uint8 tensors of JPEG bytes (on the CPU) to RGB uint8 (3, H, W) on ``device``:
    one batched call; if the batch fails, image by image, so a bad file only costs its slot
    (its entry is then the exception).

    On a GPU the decode runs on a stream of its own, ordered after the caller's queued work, and
    the caller's stream waits for it. torchvision allocates the outputs on the current stream
    and nvJPEG's hardware engine may write them before work queued earlier has run; decoded on
    the caller's stream, an output could be a block just freed there that queued kernels still
    read (torchvision's tracker, pytorch/vision#9606: wrong pixels, not an error). On our own
    stream the outputs come from blocks only that stream used, and each output is recorded on the
    caller's stream, so its block is handed out again only once the caller's work on it is done
    (the allocator checks that on the host)."""
    if not data:
        return []
    device = torch.device(device)
    if device.type != "cuda":
        return _decode(data, device)
    consumer = torch.cuda.current_stream(device)
    stream = _decode_stream(device)
    stream.wait_stream(consumer)
    with torch.cuda.stream(stream):
        out = _decode(data, device)
    consumer.wait_stream(stream)
    for img in out:
        if isinstance(img, Tensor):
            img.record_stream(consumer)
    return out


def _decode(data: list[Tensor], device: torch.device) -> list[Tensor | Exception]:
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out: list[Tensor | Exception] = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as err:
            out.append(err)
    return out


def _resample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear with antialiasing (as PIL's resize) of a uint8 (3, h, w) image; float result."""
    return F.interpolate(x.unsqueeze(0).float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def crop_batch(
    images: list[Tensor],
    size: int,
    *,
    crops: list[Crop] | None = None,
    resize: int | None = None,
) -> Tensor:
    """Decoded images (uint8 (3, H, W), any sizes, one device) -> uint8 (N, 3, size, size).

    Training (``crops`` given): crop each image to its box, resize to size x size, mirror when
    flagged. Evaluation (``resize`` given): resize the short side to ``resize``, then take the
    centred size x size crop. Rounded to uint8 as PIL does, so both paths feed the same
    normalisation."""
    if (crops is None) == (resize is None):
        raise ValueError("crop_batch needs exactly one of crops (training) or resize (evaluation)")
    out = []
    for i, img in enumerate(images):
        _, h, w = img.shape
        if crops is not None:
            (top, left, ch, cw), flip = crops[i]
            x = _resample(img[:, top : top + ch, left : left + cw], (size, size))
            if flip:
                x = x.flip(-1)
        else:
            (nh, nw), (top, left) = centre_crop_plan(w, h, size, resize)
            x = _resample(img, (nh, nw))[:, top : top + size, left : left + size]
        out.append(x)
    if not out:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.stack(out).round_().clamp_(0, 255).to(torch.uint8)


@functools.cache
def _decodes_on(device: str) -> bool:
    try:
        jpeg = encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))
        decode_jpeg([jpeg], mode=ImageReadMode.RGB, device=device)
        return True
    except Exception:  # no CUDA, or a torchvision built without nvJPEG
        return False


def device_decode_available(device: torch.device | str) -> bool:
    """Whether torchvision can decode JPEGs on this CUDA device (tried once on a tiny image)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and _decodes_on(str(device))
