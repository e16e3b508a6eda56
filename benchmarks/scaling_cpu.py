"""Scaling on this machine: 1 vs 2 processes under torchrun (gloo), and the share of communication.

    python benchmarks/scaling_cpu.py [--epochs 2]

For each model, `largebatch train` runs under `torchrun --nproc_per_node P` for P = 1 and 2 with
the same global batch (threads per process = cores / P, set by the trainer). Throughput is the
median of the trainer's logged img/s (first two steps dropped). The communication share is the
median time of one all-reduce of the model's gradient (fp32, gloo, the same 2 processes) over
the median 2-process step time: DDP all-reduces once per global step (no_sync while
accumulating), and overlaps it with the backward pass, so this is an upper bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "fmnist_net (demo)": {"model.name": "fmnist_net", "model.options": {"width": 16}, "micro_batch": 128},
    "mlp 784-1024-1024-10": {"model.name": "mlp", "model.options": {"hidden": 1024, "depth": 2}, "micro_batch": 1024},
}


def run(procs: int, pairs: dict, out: Path) -> list[float]:
    args = []
    for key, value in {**pairs, "out": str(out)}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
           "-m", "largebatch.cli", "train", "--overwrite", *args]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS=str(2 // procs)))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["img_per_s"] for r in rows if r["kind"] == "train"][2:]


def allreduce_probe(numel: int) -> float:
    """Median seconds of one fp32 all-reduce of ``numel`` values between 2 gloo processes."""
    code = (
        "import os, time, statistics, torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        f"t = torch.ones({numel})\n"
        "ts = []\n"
        "for _ in range(30):\n"
        "    dist.barrier(); s = time.perf_counter(); dist.all_reduce(t); ts.append(time.perf_counter() - s)\n"
        "if dist.get_rank() == 0: print(statistics.median(ts[5:]))\n"
        "dist.destroy_process_group()\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(code)
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               fh.name], check=True, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        os.unlink(fh.name)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="docs/benchmarks/scaling_cpu.md")
    args = parser.parse_args()
    from largebatch.models import build_model, count_params

    lines = [
        "# Scaling on this machine: 1 vs 2 processes (gloo)",
        "",
        f"Command: `python benchmarks/scaling_cpu.py --epochs {args.epochs}` ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores). Fashion-MNIST, global batch 8192, LARS, bf16 autocast.",
        "",
        "| model | parameters | 1 process img/s | 2 processes img/s | speed-up | all-reduce (ms) | "
        "2-process step (ms) | communication share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, pairs in MODELS.items():
        pairs = {**pairs, "data.name": "fashion_mnist", "data.augment": False, "batch_size": 8192,
                 "epochs": args.epochs, "eval_every": 1000, "checkpoint_every": 1000, "progress": False,
                 "optim.exclude_bias_and_norm": False}
        params = count_params(build_model(pairs["model.name"], 10, **pairs["model.options"]))
        with tempfile.TemporaryDirectory() as tmp:
            one = statistics.median(run(1, pairs, Path(tmp) / "one"))
            two = statistics.median(run(2, pairs, Path(tmp) / "two"))
        comm = allreduce_probe(params)
        step = 8192 / two
        lines.append(f"| {name} | {params:,} | {one:,.0f} | {two:,.0f} | {two / one:.2f}x | {comm * 1e3:.2f} | "
                     f"{step * 1e3:.0f} | {comm / step:.1%} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
