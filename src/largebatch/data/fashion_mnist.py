"""Fashion-MNIST from its IDX files (gzip or plain), checked, and held on the device.

IDX: a big-endian header (magic 0x00000803 for uint8 images with 3 dims, 0x00000801 for uint8
labels with 1 dim), then the dimensions as big-endian uint32, then the bytes. Each file is
checked for its magic number, its image size (28x28), that its payload holds exactly the counted
items, that images and labels agree in number and that labels are classes 0..9; a failure names
the file.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import torch
from torch import Tensor

from largebatch.data.augment import CropFlip
from largebatch.data.base import DataError
from largebatch.data.memory import InMemorySource, Normalize

__all__ = ["DEFAULT_ROOT", "FILES", "IMAGE_MAGIC", "LABEL_MAGIC", "NUM_CLASSES", "fashion_mnist", "read_idx"]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "eval_images": "t10k-images-idx3-ubyte",
    "eval_labels": "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = 10
IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801


def _find(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"Fashion-MNIST file missing: {os.path.join(root, stem)}.gz (nor uncompressed) in {root}")


def _read_bytes(path: str) -> bytes:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"cannot read {path}: {err}") from None


def read_idx(path: str, magic: int) -> Tensor:
    """An IDX file's payload as a uint8 tensor of the shape its header declares."""
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = 1
    for d in dims:
        expected *= d
    if len(data) - header != expected:
        raise DataError(
            f"{path}: header declares {'x'.join(map(str, dims))} = {expected} bytes, file holds {len(data) - header}"
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


def _load_pair(root: str, images: str, labels: str) -> tuple[Tensor, Tensor]:
    img_path, lab_path = _find(root, FILES[images]), _find(root, FILES[labels])
    x = read_idx(img_path, IMAGE_MAGIC)
    y = read_idx(lab_path, LABEL_MAGIC)
    if tuple(x.shape[1:]) != (28, 28):
        raise DataError(f"{img_path}: images are {x.shape[1]}x{x.shape[2]}, expected 28x28")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{img_path} holds {x.shape[0]} images but {lab_path} holds {y.shape[0]} labels")
    if y.numel() and int(y.max()) >= NUM_CLASSES:
        raise DataError(f"{lab_path}: label {int(y.max())} outside 0..{NUM_CLASSES - 1}")
    if x.shape[0] == 0:
        raise DataError(f"{img_path}: no images")
    return x.unsqueeze(1), y.long()


def fashion_mnist(
    root: str | None,
    device: torch.device,
    seed: int,
    augment: bool = True,
    pad: int = 2,
    flip: bool = True,
) -> InMemorySource:
    """Fashion-MNIST (60,000 train, 10,000 test, 1x28x28, 10 classes) resident on ``device``.

    Normalised with the training set's own mean and std. With ``augment``, training batches get
    a random shift of up to ``pad`` pixels and (``flip``) a random mirror, batch-wise on the
    device."""
    root = DEFAULT_ROOT if root is None else os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"Fashion-MNIST directory not found: {root}")
    train = _load_pair(root, "train_images", "train_labels")
    evals = _load_pair(root, "eval_images", "eval_labels")
    pixels = train[0].to(torch.float64) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    norm = Normalize((mean,), (max(std, 1e-6),), torch.device(device))
    aug = CropFlip(pad=pad, flip=flip) if augment else None
    return InMemorySource(train, evals, NUM_CLASSES, norm, torch.device(device), seed, aug)
