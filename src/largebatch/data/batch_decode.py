"""JPEG bytes -> augmented uint8 crops, decoded and resampled in batches on the training device.

With nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``) the CPU only reads files: the
decode, crop, resize and flip run on the GPU, so a compiled model is not starved by a few
loader processes. The same functions run on the CPU with torchvision's libjpeg decoder, which is
how their logic is tested on machines without a GPU.

A micro-batch is cropped, resized and flipped in one batched operation (the images padded into
one tensor, the separable antialiased filter as two float64 matrix products), not a few
launches per image; the arithmetic is exact enough that an image's pixels do not depend on
which batch it travels in: rank, world size and micro-batch split cannot change them. The crop
and flip come from :func:`train_crop`, the same draws as the PIL path.
"""

from __future__ import annotations

import functools
import math
import random
import warnings

import torch
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


BATCH_BYTES = 1 << 30  # float64 bytes of one batched resample's padded images; more is split


def _filter_weights(n_out: int, span: int, offset: Tensor, length: Tensor, out_length: Tensor,
                    shift: Tensor, flip: Tensor | None) -> Tensor:
    """(N, n_out, span), the dtype of ``offset``: antialiased bilinear weights over source pixels 0..span-1.

    Row i of image n resamples the window [offset, offset + length) to ``out_length`` pixels and
    is that output's pixel i + shift (counted from the far end when flipped). The filter is
    torch's and Pillow's: a triangle widened by the scale when shrinking, rows normalised to 1."""
    device, dtype = offset.device, offset.dtype
    j = torch.arange(span, device=device, dtype=dtype).view(1, 1, -1)
    i = torch.arange(n_out, device=device, dtype=dtype).view(1, -1, 1)
    if flip is not None:
        i = torch.where(flip.view(-1, 1, 1), n_out - 1 - i, i)
    offset, length = offset.view(-1, 1, 1), length.view(-1, 1, 1)
    scale = length / out_length.view(-1, 1, 1)
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    centre = scale * (i + shift.view(-1, 1, 1) + 0.5)
    w = (1 - ((j - offset - centre + 0.5) * inv).abs()).clamp_(min=0)
    w = w * ((j >= offset) & (j < offset + length))
    return w / w.sum(-1, keepdim=True)


def _resample_batch(images: list[Tensor], size: int, plans: list[tuple[int, ...]]) -> Tensor:
    """One batched resample of images of any sizes to (N, 3, size, size) float.

    ``plans`` per image: (top, height, out_height, row_shift, left, width, out_width, col_shift,
    flip): the window resized to out_height x out_width, of which the size x size block at
    (row_shift, col_shift) is kept. The images are padded into one tensor and the separable
    filter is two batched matrix products, Wy @ x @ Wx^T: a few launches per micro-batch
    instead of a few per image, and the same weights as ``F.interpolate(antialias=True)``."""
    device = images[0].device
    h_max = max(img.shape[1] for img in images)
    w_max = max(img.shape[2] for img in images)
    x = _padded(images, h_max, w_max)
    host = torch.tensor(plans, dtype=torch.float64)
    p = (host.pin_memory() if device.type == "cuda" else host).to(device, non_blocking=True)
    wy = _filter_weights(size, h_max, p[:, 0], p[:, 1], p[:, 2], p[:, 3], None)
    wx = _filter_weights(size, w_max, p[:, 4], p[:, 5], p[:, 6], p[:, 7], p[:, 8] > 0)
    return (wy.unsqueeze(1) @ x @ wx.unsqueeze(1).transpose(-1, -2)).float()


def _padded(images: list[Tensor], h: int, w: int) -> Tensor:
    """The images as one float64 (N, 3, h, w) tensor, zero beyond each image. float64: products
    of 8-bit pixels and the weights are exact, so the padding (the largest image of the batch)
    cannot change an image's rounded pixels: they stay independent of the batch."""
    try:
        with warnings.catch_warnings():  # strided nested tensors are a "prototype": said once per run
            warnings.simplefilter("ignore", UserWarning)
            nested = torch.nested.as_nested_tensor(images, dtype=torch.float64)
        return nested.to_padded_tensor(0.0, (len(images), 3, h, w))
    except (RuntimeError, NotImplementedError):  # a build whose nested tensors lack this kernel
        x = images[0].new_zeros((len(images), 3, h, w), dtype=torch.float64)
        for k, img in enumerate(images):
            x[k, :, : img.shape[1], : img.shape[2]] = img
        return x


def _batches_within(images: list[Tensor], budget: int) -> list[range]:
    """Consecutive runs of images whose padded float copy stays within ``budget`` bytes."""
    runs, start, h, w = [], 0, 0, 0
    for k, img in enumerate(images):
        nh, nw = max(h, img.shape[1]), max(w, img.shape[2])
        if k > start and (k - start + 1) * 3 * nh * nw * 8 > budget:
            runs.append(range(start, k))
            start, nh, nw = k, img.shape[1], img.shape[2]
        h, w = nh, nw
    runs.append(range(start, len(images)))
    return runs


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
    normalisation. Each image's pixels depend on that image alone, whatever batch it is in."""
    if (crops is None) == (resize is None):
        raise ValueError("crop_batch needs exactly one of crops (training) or resize (evaluation)")
    if not images:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    plans = []
    for k, img in enumerate(images):
        _, h, w = img.shape
        if crops is not None:
            (top, left, ch, cw), flip = crops[k]
            plans.append((top, ch, size, 0, left, cw, size, 0, int(flip)))
        else:
            (nh, nw), (top, left) = centre_crop_plan(w, h, size, resize)
            plans.append((0, h, nh, top, 0, w, nw, left, 0))
    out = [_resample_batch(images[r.start : r.stop], size, plans[r.start : r.stop])
           for r in _batches_within(images, BATCH_BYTES)]
    x = out[0] if len(out) == 1 else torch.cat(out)
    return x.round_().clamp_(0, 255).to(torch.uint8)


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
