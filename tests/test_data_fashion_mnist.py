"""Fashion-MNIST: the real files when installed, and generated IDX files for every error path."""

from __future__ import annotations

import gzip
import os
import re
import struct

import pytest
import torch

from largebatch.data import DataError, build_dataset
from largebatch.data.fashion_mnist import DEFAULT_ROOT, FILES, read_idx


def write_idx(path: str, magic: int, dims: tuple[int, ...], payload: bytes, compress: bool = True) -> None:
    data = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def make_set(root, n_train: int = 40, n_eval: int = 12, compress: bool = True) -> str:
    g = torch.Generator().manual_seed(0)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("eval", n_eval)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n, dtype=torch.uint8) % 10
        stem = os.path.join(root, "")
        write_idx(stem + FILES[f"{split}_images"] + suffix, 0x803, (n, 28, 28), images.numpy().tobytes(), compress)
        write_idx(stem + FILES[f"{split}_labels"] + suffix, 0x801, (n,), labels.numpy().tobytes(), compress)
    return str(root)


@pytest.mark.skipif(not os.path.isdir(DEFAULT_ROOT), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist():
    src = build_dataset("fashion_mnist", root=None, device="cpu", seed=0)
    assert (src.num_train, src.num_eval, src.num_classes, src.input_shape) == (60_000, 10_000, 10, (1, 28, 28))
    assert src.train_x.dtype == torch.uint8 and src.train_x.device.type == "cpu"  # resident as uint8
    assert torch.equal(torch.bincount(src.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(src.eval_y), torch.full((10,), 1000))
    assert abs(src.normalize.mean[0] - 0.2860) < 1e-3 and abs(src.normalize.std[0] - 0.3530) < 1e-3
    assert src.steps_per_epoch(8192) == 7
    step = next(iter(src.train_batches(0, 8192, 2048, 1, 2)))
    assert len(step) == 2 and step[0][0].shape == (2048, 1, 28, 28)
    n = sum(len(y) for r in range(3) for _, y in src.eval_batches(1000, r, 3))
    assert n == 10_000


@pytest.mark.parametrize("compress", [True, False])
def test_generated_set_loads(tmp_path, compress):
    src = build_dataset("fashion_mnist", root=make_set(tmp_path, compress=compress), device="cpu", seed=1, pad=1)
    assert (src.num_train, src.num_eval, src.input_shape) == (40, 12, (1, 28, 28))
    assert src.augment is not None and src.augment.pad == 1
    _, y = next(iter(src.eval_batches(12, 0, 1)))
    assert torch.equal(y, torch.arange(12) % 10)
    # normalised with the training set's own statistics
    xs = torch.cat([x for step in src.train_batches(0, 40, 40, 0, 1) for x, _ in step])
    plain = build_dataset("fashion_mnist", root=str(tmp_path), device="cpu", seed=1, augment=False)
    xp = torch.cat([x for step in plain.train_batches(0, 40, 40, 0, 1) for x, _ in step])
    assert abs(float(xp.mean())) < 1e-4 and abs(float(xp.std()) - 1) < 1e-3
    assert not torch.equal(xs, xp)


def _corrupt(root: str, key: str, data: bytes) -> str:
    path = os.path.join(root, FILES[key] + ".gz")
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def test_wrong_magic_names_the_file(tmp_path):
    root = make_set(tmp_path)
    path = _corrupt(root, "train_labels", struct.pack(">II", 0x803, 0))
    with pytest.raises(DataError, match=re.escape(f"{path}: magic number 0x00000803, expected 0x00000801")):
        build_dataset("fashion_mnist", root=root, device="cpu", seed=0)


def test_truncated_payload(tmp_path):
    root = make_set(tmp_path)
    path = _corrupt(root, "eval_images", struct.pack(">IIII", 0x803, 12, 28, 28) + bytes(100))
    with pytest.raises(DataError, match=re.escape(f"{path}: header declares 12x28x28 = 9408 bytes, file holds 100")):
        build_dataset("fashion_mnist", root=root, device="cpu", seed=0)


def test_count_mismatch_and_size_and_labels(tmp_path):
    root = make_set(tmp_path)
    lab = _corrupt(root, "train_labels", struct.pack(">II", 0x801, 39) + bytes(39))
    with pytest.raises(DataError, match=re.escape(f"holds 40 images but {lab} holds 39 labels")):
        build_dataset("fashion_mnist", root=root, device="cpu", seed=0)
    _corrupt(root, "train_labels", struct.pack(">II", 0x801, 40) + bytes([10] * 40))
    with pytest.raises(DataError, match=r"label 10 outside 0\.\.9"):
        build_dataset("fashion_mnist", root=root, device="cpu", seed=0)
    img = _corrupt(root, "train_images", struct.pack(">IIII", 0x803, 40, 32, 32) + bytes(40 * 32 * 32))
    with pytest.raises(DataError, match=re.escape(f"{img}: images are 32x32, expected 28x28")):
        build_dataset("fashion_mnist", root=root, device="cpu", seed=0)


def test_not_gzip_missing_file_and_directory(tmp_path):
    root = make_set(tmp_path)
    path = os.path.join(root, FILES["eval_labels"] + ".gz")
    with open(path, "wb") as f:
        f.write(b"this is not gzip data")
    with pytest.raises(DataError, match=re.escape(f"cannot read {path}")):
        build_dataset("fashion_mnist", root=root, device="cpu", seed=0)
    os.remove(path)
    with pytest.raises(DataError, match=r"Fashion-MNIST file missing: .*t10k-labels-idx1-ubyte"):
        build_dataset("fashion_mnist", root=root, device="cpu", seed=0)
    with pytest.raises(DataError, match="Fashion-MNIST directory not found: /nonexistent/fm"):
        build_dataset("fashion_mnist", root="/nonexistent/fm", device="cpu", seed=0)


def test_read_idx_short_file(tmp_path):
    path = str(tmp_path / "x.gz")
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="too short for an IDX header"):
        read_idx(path, 0x801)
