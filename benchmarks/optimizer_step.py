"""Time of one optimizer step on ResNet-50's full parameter set, against torch's SGD in the same run.

    python benchmarks/optimizer_step.py [--rounds 25] [--device cpu] [--out docs/benchmarks/optimizer_step.md]

Every variant steps the same 161 tensors (25.6M fp32 values) with fixed gradients. Rounds are
interleaved (one step of each variant per round) so that drift in the machine's speed hits all
variants alike; the figure is the median over rounds, and the ratio is against
``torch.optim.SGD(momentum=0.9, weight_decay, foreach=True)`` measured in the same rounds. The
first-step cost of the fused path is measured in a fresh process with an empty compile cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from largebatch.optim import LARS

WEIGHT_DECAY = 5e-4


def resnet50_tensors(device: torch.device) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().to(device) for p in torchvision.models.resnet50().parameters()]


def make_variants(device: torch.device) -> dict[str, torch.optim.Optimizer]:
    base = resnet50_tensors(device)
    grads = [torch.randn_like(t) * 1e-3 for t in base]

    def params() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(t.clone()) for t in base]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        return ps

    variants: dict[str, torch.optim.Optimizer] = {
        "torch SGD (foreach)": torch.optim.SGD(
            params(), lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY, foreach=True
        ),
        "largebatch LARS, single-tensor": LARS(params(), lr=0.1, weight_decay=WEIGHT_DECAY, foreach=False),
        "largebatch LARS, foreach": LARS(params(), lr=0.1, weight_decay=WEIGHT_DECAY, foreach=True),
        "largebatch LARS, fused": LARS(params(), lr=0.1, weight_decay=WEIGHT_DECAY, fused=True),
    }
    try:
        from timm.optim import Lars as TimmLars

        variants["timm Lars"] = TimmLars(
            params(), lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY, trust_coeff=0.001
        )
    except ImportError:
        print("timm not installed: its Lars is left out", file=sys.stderr)
    return variants


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    steps: dict[str, Callable[[], None]], rounds: int, device: torch.device
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def cold_first_step_seconds(device: str) -> float:
    """First fused step in a new process with an empty inductor cache: the compile a user pays."""
    code = (
        "import time, torch, torchvision\n"
        "from largebatch.optim import LARS\n"
        f"ps=[torch.nn.Parameter(p.detach().to('{device}')) for p in torchvision.models.resnet50().parameters()]\n"
        "for p in ps: p.grad=torch.randn_like(p)\n"
        "opt=LARS(ps, lr=0.1, weight_decay=5e-4, fused=True)\n"
        "t=time.perf_counter(); opt.step(); torch.cuda.synchronize() if ps[0].is_cuda else None\n"
        "first=time.perf_counter()-t\n"
        "t=time.perf_counter(); opt.step(); torch.cuda.synchronize() if ps[0].is_cuda else None\n"
        "print(first-(time.perf_counter()-t))\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="docs/benchmarks/optimizer_step.md")
    args = parser.parse_args()
    device = torch.device(args.device)

    compile_s = cold_first_step_seconds(args.device)
    variants = make_variants(device)
    steps = {name: opt.step for name, opt in variants.items()}
    for step in steps.values():  # warm-up: allocate state, compile the fused path
        step()
        step()
    medians = interleaved_medians(steps, args.rounds, device)
    base = medians["torch SGD (foreach)"]

    n_values = sum(p.numel() for p in variants["torch SGD (foreach)"].param_groups[0]["params"])
    lines = [
        "# Optimizer step: ResNet-50 parameter set",
        "",
        f"Command: `python benchmarks/optimizer_step.py --rounds {args.rounds} --device {args.device}`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, device {args.device}. 161 tensors, {n_values / 1e6:.1f}M fp32 values, "
        f"median of {args.rounds} interleaved rounds.",
        "",
        "| optimizer | median step (ms) | vs torch SGD |",
        "|---|---:|---:|",
    ]
    for name, t in medians.items():
        lines.append(f"| {name} | {t * 1e3:.1f} | {t / base:.2f}x |")
    if "timm Lars" in medians:
        speedup = medians["timm Lars"] / medians["largebatch LARS, fused"]
        lines += ["", f"LARS fused is {speedup:.2f}x faster than timm's Lars."]
    lines += [
        "",
        f"First fused step, cold compile cache, minus a normal step: {compile_s:.1f} s "
        "(one compile per process; later processes reuse inductor's on-disk cache).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
