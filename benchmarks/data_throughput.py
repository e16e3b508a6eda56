"""Images per second delivered by each data path, next to the images per second the matching
model trains at, measured in the same run on the same machine.

    PYTHONPATH=src python benchmarks/data_throughput.py [--repeats 3] [--out docs/benchmarks/data_throughput.md]

Data rates are measured alone (no model running), from the first batch to the last of a pass;
model rates are one optimizer step (forward, backward, LARS) per micro-batch on random input.
Each figure is the median of ``--repeats`` runs. A ratio data/model above 1 means the data path
can keep up with training.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from largebatch.data import build_dataset
from largebatch.models import build_model, profile_model
from largebatch.optim import LARS, param_groups


def median_rate(fn: Callable[[], int], repeats: int) -> float:
    """Median over runs of images / seconds, where fn() returns the images it produced."""
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def data_rate(src, global_batch: int, micro: int, steps: int, repeats: int) -> float:
    def one_pass() -> int:
        n = 0
        for i, step in enumerate(src.train_batches(0, global_batch, micro, 0, 1)):
            n += sum(len(y) for _, y in step)
            if i + 1 == steps:
                break
        return n

    one_pass()  # warm-up (and start persistent workers)
    return median_rate(one_pass, repeats)


def model_rate(name: str, shape: tuple[int, int, int], classes: int, batch: int, steps: int, repeats: int,
               bf16: bool = False, channels_last: bool = False) -> float:
    torch.manual_seed(0)
    model = build_model(name, classes, in_channels=shape[0])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = LARS(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    x = torch.randn(batch, *shape).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,))

    def train(k: int) -> int:
        for _ in range(k):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return k * batch

    train(1)  # warm-up: allocator, oneDNN primitive creation
    return median_rate(lambda: train(steps), repeats)


def write_jpegs(root: str, n_per_class: int, classes: int) -> None:
    """An ImageNet-like folder: JPEGs of 400-500 x 330-375 pixels (ImageNet's typical size)."""
    from PIL import Image

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_per_class), ("val", max(1, n_per_class // 4))):
        for c in range(classes):
            d = os.path.join(root, split, f"class{c:03d}")
            os.makedirs(d)
            for i in range(n):
                w, h = rng.randint(400, 500), rng.randint(330, 375)
                # smooth random content: low-resolution noise upscaled, so JPEG sizes are realistic
                small = torch.randint(0, 256, (h // 16, w // 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(small).resize((w, h), Image.BILINEAR).save(os.path.join(d, f"{i}.jpg"), quality=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="docs/benchmarks/data_throughput.md")
    parser.add_argument("--workers", type=int, default=2, help="imagefolder loader processes")
    args = parser.parse_args(argv)
    r = args.repeats
    cpu = torch.device("cpu")
    rows: list[tuple[str, float, str, float]] = []
    models: list[tuple[str, str, float, int]] = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Fashion-MNIST resident on the device, batch-wise crop + flip; global 8192 in micro-batches of 1024
    fm = build_dataset("fashion_mnist", root=None, device=cpu, seed=0)
    fm_rate = data_rate(fm, 8192, 1024, steps=7, repeats=r)
    log(f"fashion_mnist data: {fm_rate:,.0f} img/s")
    for name, bf16, cl in [
        ("fmnist_net", False, False),
        ("fmnist_net", False, True),
        ("fmnist_net", True, True),
        ("resnet_small", False, False),
        ("resnet_small", True, True),
        ("alexnet_bn_small", False, False),
        ("alexnet_bn_small", True, True),
    ]:
        rate = model_rate(name, (1, 28, 28), 10, 1024, steps=3, repeats=r, bf16=bf16, channels_last=cl)
        prec = ("bf16 autocast" if bf16 else "fp32") + (" + channels_last" if cl else "")
        macs = profile_model(build_model(name, 10), (1, 28, 28)).macs
        models.append((name, prec, rate, macs))
        rows.append(("fashion_mnist (batch 8192 / micro 1024, crop+flip)", fm_rate, f"{name}, {prec}", rate))
        log(f"{name} {prec}: {rate:,.0f} img/s")

    # synthetic ImageNet-shaped, on-device crop + flip, micro-batches of 64
    for name, size in (("alexnet_bn", 227), ("resnet50", 224)):
        syn = build_dataset("synthetic", root=None, device=cpu, seed=0, shape=(3, size, size), pool_size=256)
        syn_rate = data_rate(syn, 256, 64, steps=2, repeats=r)
        rate = model_rate(name, (3, size, size), 1000, 32, steps=1, repeats=r)
        macs = profile_model(build_model(name, 1000), (3, size, size)).macs
        models.append((name, "fp32", rate, macs))
        rows.append((f"synthetic 3x{size}x{size} (micro 64, crop+flip)", syn_rate, f"{name}, fp32, micro 32", rate))
        log(f"synthetic {size}: {syn_rate:,.0f} img/s; {name}: {rate:,.1f} img/s")

    # imagefolder: JPEGs decoded by worker processes, random-resized crop to 224 + flip
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(tmp, n_per_class=48, classes=8)  # 384 train, 96 val images
        folder = build_dataset("imagefolder", root=tmp, device=cpu, seed=0, workers=args.workers)
        img_rate = data_rate(folder, 64, 32, steps=6, repeats=r)
        resnet = next(m for m in models if m[0] == "resnet50")[2]
        alex = next(m for m in models if m[0] == "alexnet_bn")[2]
        label = f"imagefolder JPEG ~450x350 -> 224 ({args.workers} workers, micro 32)"
        rows.append((label, img_rate, "resnet50, fp32", resnet))
        rows.append((label, img_rate, "alexnet_bn, fp32 (227 crop)", alex))
        log(f"imagefolder: {img_rate:,.0f} img/s")

    lines = [
        "# Data throughput next to model training throughput",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Median of {r} runs each.",
        "",
        "Reproduce: `PYTHONPATH=src .venv/bin/python benchmarks/data_throughput.py`",
        "",
        "| data path | data img/s | model (training) | model img/s | data / model |",
        "|---|---:|---|---:|---:|",
    ]
    for path, d, m, mr in rows:
        lines.append(f"| {path} | {d:,.0f} | {m} | {mr:,.1f} | {d / mr:,.1f} |")
    lines += [
        "",
        "Model training speed (one LARS step per micro-batch, forward + backward, random input):",
        "",
        "| model | precision | img/s | forward MACs / image |",
        "|---|---|---:|---:|",
    ]
    for name, prec, rate, macs in models:
        lines.append(f"| {name} | {prec} | {rate:,.1f} | {macs / 1e6:,.2f} M |")
    lines += [
        "",
        "Data rates are measured alone; while training, the data path shares the same cores (for",
        "imagefolder, its worker processes compete with the training threads).",
        "",
    ]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
