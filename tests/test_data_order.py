"""The ordering contract, batch-wise augmentation and the in-memory sources (synthetic, toy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from largebatch.data import DATASET_NAMES, DataError, build_dataset, dataset_options
from largebatch.data.augment import CropFlip, crop_flip
from largebatch.data.memory import InMemorySource, Normalize
from largebatch.data.order import epoch_permutation, eval_shard, mix_seed, plan_steps

CPU = torch.device("cpu")


def toy(n: int = 103, n_eval: int = 37, augment: bool = True, seed: int = 5) -> InMemorySource:
    """Example i has label i, so batches reveal which examples they hold."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 2, 6, 5), generator=g, dtype=torch.uint8)
    xe = torch.randint(0, 256, (n_eval, 2, 6, 5), generator=g, dtype=torch.uint8)
    norm = Normalize((0.5, 0.25), (0.2, 0.4), CPU)
    aug = CropFlip(pad=2, flip=True) if augment else None
    return InMemorySource((x, torch.arange(n)), (xe, torch.arange(n_eval)), n, norm, CPU, seed, aug)


def test_mix_seed_separates_tuples():
    assert mix_seed(0, 1) != mix_seed(1, 0)
    assert mix_seed(3, 4) == mix_seed(3, 4)
    assert 0 <= mix_seed(2**70, -1) < 2**63


def test_epoch_permutation():
    p = epoch_permutation(1000, seed=1, epoch=0)
    assert torch.equal(p.sort().values, torch.arange(1000))
    assert torch.equal(p, epoch_permutation(1000, 1, 0))
    assert not torch.equal(p, epoch_permutation(1000, 1, 1))
    assert not torch.equal(p, epoch_permutation(1000, 2, 0))


def test_plan_steps_checks():
    plan, steps = plan_steps(103, 24, 4, rank=1, world=3)
    assert steps == 4 and plan.per_rank == 8 and plan.accumulation == 2
    assert plan.micro_positions() == [(8, 12), (12, 16)]
    with pytest.raises(ValueError, match="not a multiple of world x micro_batch = 3 x 5"):
        plan_steps(103, 24, 5, 0, 3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\)"):
        plan_steps(103, 24, 4, 3, 3)
    with pytest.raises(ValueError, match="start_step"):
        plan_steps(103, 24, 4, 0, 3, start_step=5)
    with pytest.raises(ValueError, match="global_batch"):
        plan_steps(103, 0, 4, 0, 1)


def test_steps_per_epoch_drops_partial_batch():
    src = toy()
    assert src.steps_per_epoch(24) == 4
    assert src.steps_per_epoch(200) == 0
    assert list(src.train_batches(0, 200, 100, 0, 2)) == []


@pytest.mark.parametrize(("world", "micro"), [(1, 24), (1, 6), (2, 12), (2, 3), (3, 4), (4, 6)])
def test_union_of_rank_shards_is_the_permutation(world, micro):
    src, B, epoch = toy(), 24, 3
    perm = epoch_permutation(src.num_train, src.seed, epoch)
    per_rank = [list(src.train_batches(epoch, B, micro, r, world)) for r in range(world)]
    steps = src.steps_per_epoch(B)
    assert all(len(batches) == steps for batches in per_rank)
    for s in range(steps):
        assert all(len(per_rank[r][s]) == B // (world * micro) for r in range(world))
        seen = torch.cat([y for r in range(world) for _, y in per_rank[r][s]])
        assert torch.equal(seen, perm[s * B : (s + 1) * B])  # rank-major, in order, no gaps or repeats
    # nothing outside the dropped tail is missed
    assert steps * B == 96 and src.num_train - steps * B == 7


def _flat(batches):
    batches = list(batches)
    xs = [x for step in batches for x, _ in step]
    ys = [y for step in batches for _, y in step]
    return torch.cat(xs), torch.cat(ys)


def test_split_invariance_bit_for_bit():
    """2 ranks x micro b == 1 rank x 2 accumulation steps of b == 1 rank x micro 2b."""
    src, B, b = toy(), 24, 6
    ref_x, ref_y = _flat(src.train_batches(1, B, 2 * b, 0, 1))  # one rank, two micro-batches of 2b
    acc_x, acc_y = _flat(src.train_batches(1, B, b, 0, 1))  # one rank, four of b
    r0, r1 = (list(src.train_batches(1, B, b, r, 2)) for r in range(2))
    two = [[*s0, *s1] for s0, s1 in zip(r0, r1, strict=True)]
    two_x, two_y = _flat(two)
    for x, y in ((acc_x, acc_y), (two_x, two_y)):
        assert torch.equal(y, ref_y)
        assert torch.equal(x, ref_x)  # bitwise, augmentation included


def test_resume_yields_the_same_batches():
    src = toy()
    full = list(src.train_batches(2, 24, 4, 1, 3))
    resumed = list(src.train_batches(2, 24, 4, 1, 3, start_step=2))
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed, strict=True):
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmentation_depends_on_epoch_and_step_not_rank():
    src = toy()
    (x0, y0), = next(iter(src.train_batches(0, 24, 24, 0, 1)))  # fmt: skip
    again, = next(iter(src.train_batches(0, 24, 24, 0, 1)))  # fmt: skip
    assert torch.equal(again[0], x0)
    plain = toy(augment=False)
    (xp, yp), = next(iter(plain.train_batches(0, 24, 24, 0, 1)))  # fmt: skip
    assert torch.equal(yp, y0) and not torch.equal(xp, x0)
    assert torch.equal(xp, plain.normalize(plain.train_x[y0]))


def test_eval_covers_every_example_once():
    src = toy(n_eval=37)
    for world in (1, 2, 3, 5, 8):
        ys = [y for r in range(world) for _, y in src.eval_batches(4, r, world)]
        assert torch.equal(torch.cat(ys), torch.arange(37))
    assert eval_shard(10, 2, 3) == (6, 10)
    x, y = next(iter(src.eval_batches(5, 0, 1)))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (5, 2, 6, 5)


def test_normalize_values():
    src = toy(augment=False)
    x, _ = next(iter(src.eval_batches(3, 0, 1)))
    raw = src.eval_x[:3].double() / 255
    expect = (raw - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1).double()) / torch.tensor([0.2, 0.4]).view(1, 2, 1, 1)
    torch.testing.assert_close(x.double(), expect, rtol=1e-6, atol=1e-5)


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 3, 7, 9), generator=g, dtype=torch.uint8)
    aug = CropFlip(pad=3, flip=True)
    d = aug.draw(64, g)
    out = aug(x, d)
    for i in range(64):
        p = F.pad(x[i], (3, 3, 3, 3))
        ref = p[:, d.dy[i] : d.dy[i] + 7, d.dx[i] : d.dx[i] + 9]
        if d.flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    assert d.flip.any() and not d.flip.all() and len(set(d.dx.tolist())) == 7
    none = CropFlip(pad=0, flip=False)
    assert torch.equal(crop_flip(x, none.draw(64, g), 0), x)
    with pytest.raises(ValueError):
        CropFlip(pad=-1)


def test_synthetic_shapes_and_defaults():
    src = build_dataset("synthetic", root=None, device="cpu", seed=0, shape=(3, 32, 32), num_classes=7, pool_size=16)
    assert (src.num_train, src.num_eval, src.num_classes, src.input_shape) == (65_536, 10_000, 7, (3, 32, 32))
    step = next(iter(src.train_batches(0, 64, 16, 1, 2)))
    assert len(step) == 2
    x, y = step[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) < 7
    imagenet = build_dataset("synthetic", root=None, device="cpu", seed=0, augment=False, pool_size=4)
    assert imagenet.input_shape == (3, 224, 224) and imagenet.num_classes == 1000
    (x, _), = next(iter(imagenet.train_batches(0, 8, 8, 0, 1)))  # fmt: skip
    assert x.shape == (8, 3, 224, 224)
    with pytest.raises(DataError, match="shape"):
        build_dataset("synthetic", root=None, device="cpu", seed=0, shape=(3, 32))


def test_build_dataset_errors():
    assert DATASET_NAMES == ("fashion_mnist", "imagefolder", "synthetic")
    choices = "fashion_mnist, imagefolder, synthetic"
    with pytest.raises(DataError, match=f"unknown dataset 'mnist'; choose one of: {choices}"):
        build_dataset("mnist", root=None, device="cpu", seed=0)
    with pytest.raises(DataError, match="dataset 'synthetic' has no option 'size'"):
        build_dataset("synthetic", root=None, device="cpu", seed=0, size=3)
    assert issubclass(DataError, ValueError)
    assert "on_bad_image" in dataset_options("imagefolder")
