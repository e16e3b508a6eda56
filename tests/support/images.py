"""Small image folders written for a test, and the readers the data tests share."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from PIL import Image

from largebatch.data import build_dataset

SIZE = 24  # the crop side open_folder asks for


def write_textured_tree(root, n_train: int = 6, n_val: int = 3, classes: int = 2, png: bool = False) -> str:
    """root/{train,val}/c<k>/<i>.jpg of 40-90 pixels a side, smooth random texture: a wrong crop
    or a missing flip changes the pixels by about 50 grey levels on average."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = os.path.join(root, split, f"c{c}")
            os.makedirs(d)
            for i in range(n):
                w, h = rng.randint(40, 90), rng.randint(40, 90)
                small = torch.randint(0, 256, (h // 8, w // 8, 3), generator=g, dtype=torch.uint8).numpy()
                img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
                ext = "png" if png and i == 1 else "jpg"
                img.save(os.path.join(d, f"{i}.{ext}"), **({"quality": 90} if ext == "jpg" else {}))
    return str(root)


def jpeg_folder(root: Path, corrupt: bool) -> None:
    """root/{train,val}/{cat,dog}/0-3.jpg of 20x20 flat colour; corrupt: train/dog/2.jpg is not a JPEG."""
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(folder / f"{i}.jpg")
    if corrupt:
        (root / "train" / "dog" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def open_folder(root: str, decode: str = "device", **kw):
    """The imagefolder source on the CPU with SIZE crops (device decode: the batch-decode path)."""
    kw.setdefault("workers", 0)
    kw.setdefault("resize", 28)
    return build_dataset("imagefolder", root=root, device="cpu", seed=5, image_size=SIZE, decode=decode, **kw)


def collect(batches):
    """All images and labels of train_batches' steps, in order."""
    batches = list(batches)
    return (
        torch.cat([x for step in batches for x, _ in step]),
        torch.cat([y for step in batches for _, y in step]),
    )


def eval_all(src, batch: int = 4):
    """All evaluation images and labels of a one-rank run, in order."""
    pairs = list(src.eval_batches(batch, 0, 1))
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def grey_levels(src, x: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: back to the 0..255 scale the crops were made on."""
    mean = torch.tensor(src.normalize.mean).view(1, 3, 1, 1)
    std = torch.tensor(src.normalize.std).view(1, 3, 1, 1)
    return (x * std + mean) * 255
