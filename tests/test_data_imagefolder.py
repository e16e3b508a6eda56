"""imagefolder on a JPEG tree written with Pillow: transforms, order, workers, corrupt files, stops."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time

import pytest
import torch
from PIL import Image
from support.runs import cli_args, start_process

from largebatch import checkpoint as ckpt
from largebatch.data import DataError, build_dataset
from largebatch.data.imagefolder import random_resized_crop_box
from largebatch.data.order import epoch_permutation

CLASSES = ("cat", "dog", "fish")


def write_tree(root, n_train: int = 8, n_val: int = 3) -> str:
    """root/{train,val}/<class>/<i>.jpg, sizes varying, each image a flat colour plus noise."""
    rng = random.Random(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(CLASSES):
            os.makedirs(root / split / name)
            for i in range(n):
                w, h = rng.randint(30, 60), rng.randint(30, 60)
                img = Image.new("RGB", (w, h), (80 * c, 10 * i, 200 - 60 * c))
                img.putpixel((rng.randrange(w), rng.randrange(h)), (255, 255, 255))
                img.save(root / split / name / f"{i}.jpg", quality=90)
    return str(root)


def open_folder(root: str, **kw):
    kw.setdefault("workers", 0)
    return build_dataset("imagefolder", root=root, device="cpu", seed=3, image_size=24, resize=28, **kw)


def collect(batches):
    batches = list(batches)
    return (
        torch.cat([x for step in batches for x, _ in step]),
        torch.cat([y for step in batches for _, y in step]),
    )


def test_layout_shapes_and_labels(tmp_path):
    src = open_folder(write_tree(tmp_path))
    assert (src.num_train, src.num_eval, src.num_classes, src.input_shape) == (24, 9, 3, (3, 24, 24))
    assert src.classes == list(CLASSES)
    step = next(iter(src.train_batches(0, 12, 3, 0, 2)))
    assert len(step) == 2 and step[0][0].shape == (3, 3, 24, 24) and step[0][0].dtype == torch.float32
    # training order: the epoch permutation, labels taken from the folder names
    _, y = collect(src.train_batches(1, 12, 12, 0, 1))
    perm = epoch_permutation(24, 3, 1)
    assert torch.equal(y, torch.tensor([src.train_samples[i][1] for i in perm[:24].tolist()]))
    x, y = next(iter(src.eval_batches(9, 0, 1)))
    assert torch.equal(y, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    # evaluation: resize + centre crop of a flat colour gives that colour, normalised
    mean, std = torch.tensor(src.normalize.mean), torch.tensor(src.normalize.std)
    expect = (torch.tensor([80.0, 10.0, 140.0]) / 255 - mean) / std  # dog, image 1
    centre = x[4, :, 12, 12]
    assert torch.allclose(centre, expect, atol=0.05)


def test_crop_box_is_seeded_and_inside():
    for seed in range(200):
        w, h = 50 + seed % 37, 40 + seed % 23
        top, left, ch, cw = random_resized_crop_box(w, h, random.Random(seed))
        assert top >= 0 and left >= 0 and ch > 0 and cw > 0 and top + ch <= h and left + cw <= w
        assert (top, left, ch, cw) == random_resized_crop_box(w, h, random.Random(seed))
    # nothing fits a 1000:1 strip within aspect 3/4..4/3 at this scale: centred fallback
    assert random_resized_crop_box(1000, 1, random.Random(0), scale=(0.9, 1.0)) == (0, 499, 1, 1)


def test_split_resume_and_workers_give_identical_batches(tmp_path):
    root = write_tree(tmp_path)
    one = open_folder(root)
    ref_x, ref_y = collect(one.train_batches(2, 12, 6, 0, 1))
    acc_x, acc_y = collect(one.train_batches(2, 12, 2, 0, 1))
    r0 = list(one.train_batches(2, 12, 3, 0, 2))
    r1 = list(one.train_batches(2, 12, 3, 1, 2))
    two_x, two_y = collect([[*a, *b] for a, b in zip(r0, r1, strict=True)])
    with_workers = open_folder(root, workers=2)
    wx, wy = collect(with_workers.train_batches(2, 12, 2, 0, 1))
    resumed_x, resumed_y = collect(with_workers.train_batches(2, 12, 2, 0, 1, start_step=1))
    again_x, _ = collect(with_workers.train_batches(2, 12, 2, 0, 1))  # persistent workers, second pass
    for x, y in ((acc_x, acc_y), (two_x, two_y), (wx, wy), (again_x, wy)):
        assert torch.equal(y, ref_y) and torch.equal(x, ref_x)
    assert torch.equal(resumed_x, ref_x[12:]) and torch.equal(resumed_y, ref_y[12:])
    other_epoch, _ = collect(one.train_batches(3, 12, 6, 0, 1))
    assert not torch.equal(other_epoch, ref_x)


def test_eval_covers_every_image_once_across_ranks(tmp_path):
    src = open_folder(write_tree(tmp_path, n_val=5))
    for world in (1, 2, 4):
        ys = torch.cat([y for r in range(world) for _, y in src.eval_batches(2, r, world)])
        assert torch.equal(ys, torch.tensor([0] * 5 + [1] * 5 + [2] * 5))


def _break(root: str) -> tuple[str, str]:
    garbage = os.path.join(root, "train", "dog", "9.jpg")
    with open(garbage, "wb") as f:
        f.write(b"not a jpeg at all")
    truncated = os.path.join(root, "val", "fish", "0.jpg")
    with open(truncated, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[: len(data) // 3])
    return garbage, truncated


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_images_fail_with_their_path(tmp_path, workers):
    root = write_tree(tmp_path)
    garbage, truncated = _break(root)
    src = open_folder(root, workers=workers)
    with pytest.raises(DataError, match=re.escape(f"unreadable image {garbage} (UnidentifiedImageError")):
        collect(src.train_batches(0, 25, 25, 0, 1))
    with pytest.raises(DataError, match=re.escape(f"unreadable image {truncated} (OSError")):
        list(src.eval_batches(4, 0, 1))
    # the loader still works after an error (persistent workers were reset, not killed)
    x, y = next(iter(src.eval_batches(3, 0, 1)))  # the first 3 images are fine
    assert x.shape == (3, 3, 24, 24) and torch.equal(y, torch.zeros(3, dtype=torch.int64))


def test_corrupt_images_skipped_and_counted(tmp_path):
    root = write_tree(tmp_path)
    garbage, truncated = _break(root)
    src = open_folder(root, on_bad_image="skip", workers=2)
    x, y = collect(src.train_batches(0, 25, 5, 0, 1))
    assert len(y) == 25 and src.skipped == 1 and garbage in src.bad_images
    # replaced by the next file in the listing, deterministically
    again_x, again_y = collect(open_folder(root, on_bad_image="skip").train_batches(0, 25, 25, 0, 1))
    assert torch.equal(again_x, x) and torch.equal(again_y, y)
    ys = torch.cat([y for _, y in src.eval_batches(4, 0, 1)])
    assert len(ys) == 8 and truncated in src.bad_images and src.skipped == 2  # left out, not duplicated


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="imagefolder needs a root"):
        build_dataset("imagefolder", root=None, device="cpu", seed=0)
    with pytest.raises(DataError, match="directory not found"):
        build_dataset("imagefolder", root=str(tmp_path / "nope"), device="cpu", seed=0)
    os.makedirs(tmp_path / "train")
    with pytest.raises(DataError, match="no class folders in"):
        open_folder(str(tmp_path))
    os.makedirs(tmp_path / "train" / "cat")
    with pytest.raises(DataError, match="no images"):
        open_folder(str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "a.png")
    no_val = open_folder(str(tmp_path))  # trains without val/; nothing to evaluate, and it says why
    assert (no_val.num_train, no_val.num_eval, list(no_val.eval_batches(4, 0, 1))) == (1, 0, [])
    assert no_val.eval_unavailable == f"imagefolder: no directory {tmp_path / 'val'}"
    os.makedirs(tmp_path / "val" / "cow")
    with pytest.raises(DataError, match=r"class folder .*cow has no match in train/"):
        open_folder(str(tmp_path))
    with pytest.raises(DataError, match="on_bad_image must be 'fail' or 'skip'"):
        open_folder(str(tmp_path), on_bad_image="ignore")


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_exits_143(tmp_path):
    """timeout, Slurm and Kubernetes signal every process of the group, loader workers included;
    the workers must outlive the signal so that the main process reaches its step boundary."""
    root = write_tree(tmp_path / "images", n_train=16, n_val=2)
    run = tmp_path / "run"
    pairs = {
        "model.name": "mlp", "model.options": {"hidden": 16, "depth": 1}, "data.name": "imagefolder",
        "data.root": root, "data.options": {"workers": 2},
        "batch_size": 8, "epochs": 1000, "precision": "fp32", "progress": False, "threads": 1,
        "checkpoint_every": 100_000, "log_every": 1, "out": str(run),
    }
    proc = start_process(cli_args(pairs))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be stopped"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, stderr[-2000:]
    assert "stopped by SIGTERM; checkpoint written at step" in stderr
    saved = ckpt.step_checkpoints(run / "checkpoints")[-1]
    state = ckpt.load_checkpoint(saved)
    assert state["step"] == int(saved.stem.split("_")[1]) >= 3
    # the crop size came from the model (mlp: 28), not ImageNet's 224
    assert state["model"]["1.weight"].shape == (16, 3 * 28 * 28)


def test_workers_ignore_sigterm_from_others_but_obey_their_main_process(tmp_path):
    src = open_folder(write_tree(tmp_path), workers=2)
    ref, _ = collect(src.train_batches(0, 12, 6, 0, 1))
    loader = src._loaders["train"][0]
    workers = list(loader._iterator._workers)
    for w in workers:  # as a scheduler would: sent by another process
        subprocess.run(["kill", "-TERM", str(w.pid)], check=True)
    time.sleep(0.5)
    assert all(w.is_alive() for w in workers)
    again, _ = collect(src.train_batches(0, 12, 6, 0, 1))
    assert torch.equal(again, ref)
    for w in workers:  # as the DataLoader's shutdown and multiprocessing's exit handler do
        w.terminate()
        w.join(timeout=10)
    assert [w.exitcode for w in workers] == [0, 0]


def test_workers_are_born_with_sigterm_blocked(tmp_path, monkeypatch):
    """A signal to the whole process group can reach a worker between its fork and its own
    handling (seen under load: 'DataLoader worker exited unexpectedly' instead of exit 143), so
    workers must inherit a mask that already blocks SIGTERM, and the main process must get its
    own mask back once they are started."""
    import importlib

    imagefolder = importlib.import_module("largebatch.data.imagefolder")
    record = tmp_path / "masks"
    original = imagefolder._ignore_sigterm_from_others

    def recording_init(worker_id: int) -> None:
        with open(record, "a") as f:  # the mask as inherited, before our own handling runs
            f.write(f"{signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])}\n")
        original(worker_id)

    monkeypatch.setattr(imagefolder, "_ignore_sigterm_from_others", recording_init)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    src = open_folder(write_tree(tmp_path / "images"), workers=2)
    collect(src.train_batches(0, 12, 6, 0, 1))
    assert record.read_text().split() == ["True", "True"]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
