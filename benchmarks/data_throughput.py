"""Images per second delivered by each data path, next to the images per second the matching
model trains at, measured in the same run on the same machine.

    PYTHONPATH=src python benchmarks/data_throughput.py [--repeats 5] [--out docs/benchmarks/data_throughput.md]
        [--device cpu|cuda] [--only-imagefolder]

Data rates are measured alone (no model running), from the first batch to the last of a pass;
model rates are one optimizer step (forward, backward, LARS) per micro-batch on random input.
Each figure is the median of ``--repeats`` rounds, every round running every measurement once
(interleaved, so that the load of a shared machine hits all of them alike). A ratio data/model
above 1 means the data path can keep up with training.

imagefolder is measured both ways: Pillow decoding and cropping in the loader workers
(decode="cpu"), and workers that only read bytes with JPEGs decoded and cropped in batches
on ``--device`` (decode="device": libjpeg on the CPU, nvJPEG on a GPU), each as a ratio to
the Pillow path measured in the same rounds. ``--only-imagefolder`` skips the models and the
in-memory paths (a quick check, e.g. on a GPU host).
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


def interleaved_rates(
    jobs: dict[str, Callable[[], int]], repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, float]:
    """Median over ``repeats`` rounds of images / second for each job; each round runs every
    job once, so a change in the machine's load (it is shared) hits all jobs alike. A job
    returns the number of images it produced."""
    for fn in jobs.values():
        fn()  # warm-up: allocator, oneDNN primitives, loader workers
    rates: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for key, fn in jobs.items():
            t = time.perf_counter()
            n = fn()
            sync()  # work queued on a GPU counts
            rates[key].append(n / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()}


def data_job(src, global_batch: int, micro: int, steps: int) -> Callable[[], int]:
    def one_pass() -> int:
        n = 0
        for i, step in enumerate(src.train_batches(0, global_batch, micro, 0, 1)):
            n += sum(len(y) for _, y in step)
            if i + 1 == steps:
                break
        return n

    return one_pass


def model_job(name: str, shape: tuple[int, int, int], classes: int, batch: int, steps: int,
              bf16: bool = False, channels_last: bool = False) -> Callable[[], int]:
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

    return lambda: train(steps)


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


def imagefolder_jobs(root: str, device: torch.device, workers: int) -> dict[str, Callable[[], int]]:
    """The same folder read both ways: Pillow in the workers, and bytes decoded on ``device``."""
    jobs = {}
    for decode in ("cpu", "device"):
        folder = build_dataset("imagefolder", root=root, device=device, seed=0, workers=workers, decode=decode)
        jobs[f"data:imagefolder:{decode}"] = data_job(folder, 64, 32, steps=3)
    return jobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None,
                        help="markdown file to write (default: docs/benchmarks/data_throughput.md for a full run, "
                             "nothing with --only-imagefolder)")
    parser.add_argument("--workers", type=int, default=2, help="imagefolder loader processes")
    parser.add_argument("--device", default="cpu", help="where imagefolder batches are decoded and delivered")
    parser.add_argument("--only-imagefolder", action="store_true", help="measure the two imagefolder paths only")
    args = parser.parse_args(argv)
    if args.out is None and not args.only_imagefolder:
        args.out = "docs/benchmarks/data_throughput.md"
    r = args.repeats
    cpu = torch.device("cpu")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load_before = os.getloadavg()[0]
    rows: list[tuple[str, str, str, str]] = []  # (data label, data key, model label, model key)
    jobs: dict[str, Callable[[], int]] = {}
    macs: dict[str, int] = {}

    if not args.only_imagefolder:
        # Fashion-MNIST resident on the device, batch-wise crop + flip; global 8192 in micro-batches of 1024
        fm = build_dataset("fashion_mnist", root=None, device=cpu, seed=0)
        jobs["data:fashion_mnist"] = data_job(fm, 8192, 1024, steps=2)
        small = [
            ("fmnist_net", False, False),
            ("fmnist_net", False, True),
            ("fmnist_net", True, True),
            ("resnet_small", False, True),
            ("resnet_small", True, True),
            ("alexnet_bn_small", False, True),
            ("alexnet_bn_small", True, True),
        ]
        for name, bf16, cl in small:
            prec = ("bf16 autocast" if bf16 else "fp32") + (" + channels_last" if cl else "")
            key = f"{name}|{prec}"
            jobs[key] = model_job(name, (1, 28, 28), 10, 1024, steps=2, bf16=bf16, channels_last=cl)
            macs[key] = profile_model(build_model(name, 10), (1, 28, 28)).macs
            rows.append(("fashion_mnist (batch 8192 / micro 1024, crop+flip)", "data:fashion_mnist", key, key))

        # synthetic ImageNet-shaped, on-device crop + flip, micro-batches of 64
        for name, size in (("alexnet_bn", 227), ("resnet50", 224)):
            syn = build_dataset("synthetic", root=None, device=cpu, seed=0, shape=(3, size, size), pool_size=256)
            jobs[f"data:synthetic{size}"] = data_job(syn, 128, 64, steps=2)
            key = f"{name}|fp32"
            jobs[key] = model_job(name, (3, size, size), 1000, 16, steps=1)
            macs[key] = profile_model(build_model(name, 1000), (3, size, size)).macs
            rows.append((f"synthetic 3x{size}x{size} (micro 64, crop+flip)", f"data:synthetic{size}", key, key))

    # imagefolder, random-resized crop to 224 + flip: Pillow in workers, or bytes decoded in batches
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(tmp, n_per_class=32, classes=8)  # 256 train, 64 val images
        jobs.update(imagefolder_jobs(tmp, device, args.workers))
        if not args.only_imagefolder:
            for decode, how in (("cpu", "Pillow in workers"), ("device", f"bytes, batch decode on {device}")):
                label = f"imagefolder JPEG ~450x350 -> 224 ({how}, {args.workers} workers, micro 32)"
                for model in ("resnet50|fp32", "alexnet_bn|fp32"):
                    rows.append((label, f"data:imagefolder:{decode}", model, model))
        rates = interleaved_rates(jobs, r, sync)
    load_after = os.getloadavg()[0]
    for key, rate in rates.items():
        print(f"{key}: {rate:,.1f} img/s", file=sys.stderr)

    pillow, batch = rates["data:imagefolder:cpu"], rates["data:imagefolder:device"]
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    cmd = "PYTHONPATH=src .venv/bin/python benchmarks/data_throughput.py"
    cmd += f" --device {args.device}" if args.device != "cpu" else ""
    cmd += " --only-imagefolder" if args.only_imagefolder else ""
    lines = [
        "# Data throughput next to model training throughput",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores{gpu}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Median of {r} interleaved runs each; "
        f"the machine is shared (1-minute load average {load_before:.1f} before, {load_after:.1f} after).",
        "",
        f"Reproduce: `{cmd}`",
        "",
        "## imagefolder: where JPEGs are decoded",
        "",
        f"The same 256 JPEGs (~450x350, quality 90) cropped to 224 with flips, global batch 64 in micro-batches "
        f"of 32, {args.workers} loader workers, batches delivered normalised on {device}.",
        "",
        "| path | img/s | vs Pillow in workers |",
        "|---|---:|---:|",
        f"| Pillow decode + crop in workers (`decode=cpu`) | {pillow:,.0f} | 1.00 |",
        f"| workers read bytes; batch decode + crop on {device} (`decode=device`) | {batch:,.0f} "
        f"| {batch / pillow:.2f} |",
    ]
    if rows:
        lines += [
            "",
            "## Every data path next to the model it feeds",
            "",
            "| data path | data img/s | model (training) | model img/s | data / model |",
            "|---|---:|---|---:|---:|",
        ]
        for path, dkey, mlabel, mkey in rows:
            d, m = rates[dkey], rates[mkey]
            lines.append(f"| {path} | {d:,.0f} | {mlabel.replace('|', ', ')} | {m:,.1f} | {d / m:,.1f} |")
    if macs:
        lines += [
            "",
            "Model training speed (one LARS step per micro-batch, forward + backward, random input):",
            "",
            "| model | precision | img/s | forward MACs / image |",
            "|---|---|---:|---:|",
        ]
        for key, mac in macs.items():
            name, prec = key.split("|")
            lines.append(f"| {name} | {prec} | {rates[key]:,.1f} | {mac / 1e6:,.2f} M |")
    lines += [
        "",
        "Data rates are measured alone; while training, the data path shares the same cores (for",
        "imagefolder, its worker processes compete with the training threads).",
        "",
    ]
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
