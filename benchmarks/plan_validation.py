"""Planner vs measurement on this machine: 2 processes under torchrun, gloo, CPU, two models.

The two probe models differ in work per parameter by about 200x: a small convnet (~0.24M
parameters, ~48M multiply-adds per 32x32 image) and a wide MLP (~29M parameters, ~29M
multiply-adds per image, 118 MB of gradients). For each, this script

1. measures one process's training throughput (1 thread, as each torchrun worker gets;
   forward, backward and SGD step: what `largebatch bench compute` measures),
2. runs a minimal DDP loop under `torchrun --nproc_per_node 2` (gloo, synthetic data, fixed
   batch, gradient_as_bucket_view so DDP adds no gradient copies) and takes the median
   iteration time, and
3. asks the planner for the same iteration with the hardware file's alpha, beta, gamma (from
   `largebatch bench comm`) and the throughput from step 1, and compares.

    PYTHONPATH=src python benchmarks/plan_validation.py \
        --hardware src/largebatch/plan/hardware/dev-2core-gloo.yaml [--hardware another.yaml] --out run.md

docs/results/planner_validation.md collects three such runs and what they mean.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from largebatch.plan.predict import bucket_sizes

BATCH = 32  # per process
WARMUP = 3
STEPS = 15


def convnet() -> nn.Module:
    """Much work per parameter: convolutions at full 32x32 resolution, tiny classifier."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def mlp() -> nn.Module:
    """One multiply-add per parameter per image: the gradient all-reduce weighs as much as compute."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3072, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                         nn.Linear(4096, 10))


MODELS = {"convnet": convnet, "mlp": mlp}
SHAPE = (3, 32, 32)


def _step_times(model: nn.Module, steps: int) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(BATCH, *SHAPE)
    y = torch.randint(0, 10, (BATCH,))
    times = []
    for i in range(WARMUP + steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    return times


def worker(out: str) -> None:
    """Under torchrun: DDP over gloo, median iteration per model, written by rank 0."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    result = {"loadavg_start": os.getloadavg()[0]}
    for name, build in MODELS.items():
        # the same steps without DDP, both ranks at once: compute when every core is busy, no communication
        dist.barrier()
        busy = torch.tensor([statistics.median(_step_times(build(), STEPS))], dtype=torch.float64)
        dist.all_reduce(busy, op=dist.ReduceOp.MAX)
        torch.manual_seed(0)
        model = DDP(build(), gradient_as_bucket_view=True)
        dist.barrier()
        times = _step_times(model, STEPS)
        med = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        # the gradient all-reduces alone, in DDP's bucket sizes, to tell a compute error from a comm error
        comm = []
        grad_bytes = sum(p.numel() for p in model.parameters()) * 4
        bufs = [torch.ones(int(b) // 4) for b in bucket_sizes(grad_bytes, 25 * 2**20)]
        for _ in range(WARMUP + 5):
            dist.barrier()
            t0 = time.perf_counter()
            for buf in bufs:
                dist.all_reduce(buf)
            comm.append(time.perf_counter() - t0)
        comm_s = torch.tensor([statistics.median(comm[WARMUP:])], dtype=torch.float64)
        dist.all_reduce(comm_s, op=dist.ReduceOp.MAX)
        result[name] = {"median_s": med.item(), "busy_compute_s": busy.item(), "comm_s": comm_s.item(),
                        "rank0_times": times}
    result["loadavg_end"] = os.getloadavg()[0]
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def single_process() -> dict[str, float]:
    """One process, one thread, no communication: seconds per training step per model."""
    torch.set_num_threads(1)
    return {name: statistics.median(_step_times(build(), STEPS)) for name, build in MODELS.items()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", required=True, action="append",
                    help="hardware YAML with this machine's fitted network (repeat to compare fits)")
    ap.add_argument("--out", help="write the Markdown result here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return

    from largebatch.plan.hardware import load_hardware
    from largebatch.plan.model import Profile
    from largebatch.plan.predict import predict_iteration

    hws = [load_hardware(h) for h in args.hardware]
    load0 = os.getloadavg()[0]
    alone = single_process()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.json")
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        subprocess.run([*torchrun, __file__, "--hardware", args.hardware[0], "--worker", out], check=True, timeout=600)
        ddp = json.loads(Path(out).read_text())

    lines = [
        "| model | params | grad MB | network fit | compute from | compute | predicted comm | measured comm "
        "| predicted serial | predicted overlap | measured DDP (2 proc) | error serial | error overlap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, build in MODELS.items():
        params = sum(p.numel() for p in build().parameters())
        prof = Profile(name, params, flops=1.0)  # FLOPs unused: compute comes from measured step times
        measured = ddp[name]["median_s"]
        computes = (("1 process alone", alone[name]), ("2 processes, no comm", ddp[name]["busy_compute_s"]))
        for hw in hws:
            for label, step in computes:
                it = predict_iteration(prof, hw, 2, 2 * BATCH, algorithm="ring", images_per_s=BATCH / step)
                lines.append(
                    f"| {name} | {params / 1e6:.2f}M | {params * 4 / 1e6:.1f} | {hw.name} | {label} "
                    f"| {step * 1e3:.1f} ms | {it.comm_s * 1e3:.1f} ms | {ddp[name]['comm_s'] * 1e3:.1f} ms "
                    f"| {it.serial_s * 1e3:.1f} ms | {it.overlap_s * 1e3:.1f} ms | {measured * 1e3:.1f} ms "
                    f"| {it.serial_s / measured - 1:+.0%} | {it.overlap_s / measured - 1:+.0%} |"
                )
    fits = "; ".join(
        f"{hw.name}: alpha {hw.network.alpha:.3g} s, beta {hw.network.beta:.3g} s/B, gamma {hw.network.gamma:.3g} s/B"
        for hw in hws
    )
    text = "\n".join(
        [
            f"{fits}; batch {BATCH} per process, {STEPS} timed steps after {WARMUP}, torch {torch.__version__}; "
            f"1-minute load average {load0:.2f} before, {ddp['loadavg_start']:.2f} / {ddp['loadavg_end']:.2f} "
            "at start / end of the torchrun part (2 cores)",
            "",
            *lines,
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
