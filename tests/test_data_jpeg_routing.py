"""Which JPEGs the device decoder gets, decided from the file's header (issue 18 item 10): those it
would decode with wrong colours (CMYK/YCCK, Adobe RGB-coded, 12-bit, arithmetic) go to Pillow."""

from __future__ import annotations

import glob
import importlib
import io
import os

import torch
from PIL import Image
from support.images import collect, eval_all, grey_levels, open_folder, read_bytes, write_textured_tree

from largebatch.data.batch_decode import decode_jpegs, device_decodable, is_complete_jpeg

imagefolder = importlib.import_module("largebatch.data.imagefolder")  # the module, not the function


def _rewrite(root: str, mode: str, **save) -> None:
    """Every image of the tree saved again as ``mode`` (and ``save`` options)."""
    for path in glob.glob(os.path.join(root, "*", "*", "*.jpg")):
        with Image.open(path) as img:
            img = img.convert(mode)
        img.save(path, quality=90, **save)


def _jpeg(mode: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 30, 90)).convert(mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _set_adobe_transform(data: bytes, transform: int) -> bytes:
    """The bytes with an Adobe APP14 segment (version 100, no flags) inserted after SOI."""
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])
    return data[:2] + app14 + data[2:]


def test_header_decides_what_the_device_decodes():
    assert device_decodable(_jpeg("RGB"))
    assert device_decodable(_jpeg("L"))  # one component: nvJPEG repeats it into R, G and B
    assert device_decodable(_jpeg("RGB", progressive=True))  # nvJPEG decodes progressive Huffman
    assert device_decodable(_set_adobe_transform(_jpeg("RGB"), 1))  # Adobe, YCbCr: fine
    assert not device_decodable(_jpeg("CMYK"))
    assert not device_decodable(_set_adobe_transform(_jpeg("RGB"), 0))  # stored as RGB, not YCbCr
    baseline = _jpeg("RGB")
    sof = baseline.index(b"\xff\xc0")
    assert not device_decodable(baseline[:sof + 4] + b"\x0c" + baseline[sof + 5:])  # 12-bit
    assert not device_decodable(baseline[:sof] + b"\xff\xc9" + baseline[sof + 2:])  # arithmetic
    assert not device_decodable(baseline[:sof])  # header cut before the frame
    assert is_complete_jpeg(baseline)


def test_cmyk_jpegs_never_reach_the_device_decoder(tmp_path, monkeypatch):
    """CMYK files go to Pillow in the workers: the device decoder never sees them, and their
    crops are the Pillow path's, pixel for pixel. (torchvision's CPU decoder converts CMYK
    itself, so wrong colours cannot show here; what is checked is that the GPU decoder, which
    hands the file to nvJPEG, would not get it.)"""
    root = write_textured_tree(tmp_path)
    _rewrite(root, "CMYK")
    given: list[int] = []

    def spy(data, device):
        given.append(len(data))
        return decode_jpegs(data, device)

    monkeypatch.setattr(imagefolder, "decode_jpegs", spy)
    dev, pil = open_folder(root), open_folder(root, decode="cpu")
    x_dev, y_dev = collect(dev.train_batches(0, 12, 4, 0, 1))
    x_pil, y_pil = collect(pil.train_batches(0, 12, 4, 0, 1))
    assert torch.equal(x_dev, x_pil) and torch.equal(y_dev, y_pil)
    assert torch.equal(eval_all(dev)[0], eval_all(pil)[0])
    assert sum(given) == 0


def test_grey_and_progressive_jpegs_stay_on_the_device_path_and_match_pillow(tmp_path):
    """Within the bound of test_batch_decode_matches_the_pillow_path (resampling rounding only)."""
    for name, mode, save in (("grey", "L", {}), ("progressive", "RGB", {"progressive": True})):
        root = write_textured_tree(tmp_path / name)
        _rewrite(root, mode, **save)
        assert device_decodable(read_bytes(glob.glob(os.path.join(root, "train", "*", "*.jpg"))[0]))
        dev, pil = open_folder(root), open_folder(root, decode="cpu")
        x_dev = collect(dev.train_batches(0, 12, 4, 0, 1))[0]
        x_pil = collect(pil.train_batches(0, 12, 4, 0, 1))[0]
        diff = (grey_levels(dev, x_dev) - grey_levels(pil, x_pil)).abs()
        assert float(diff.max()) <= 1.001 and float(diff.mean()) < 0.4, name
        assert not torch.equal(x_dev, x_pil)  # it did take the device path
