"""Trainer overhead: `largebatch train` against a minimal hand-written loop, same model, data, batch.

    python benchmarks/trainer_overhead.py [--repeats 3] [--steps 14]

Both sides run the demo's recipe (fmnist_net width 16, Fashion-MNIST, global batch 8192 in
micro-batches of 128, bf16 autocast + channels_last, LARS) in the same process, alternating
trainer and loop ``--repeats`` times. The trainer's figure is its own logged img/s per step
(which excludes evaluation and checkpoint writes, as a loop would); the loop's is timed around
each step. Medians over steps, the first two steps of each run dropped (warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from largebatch.config import load_config
from largebatch.data import build_dataset
from largebatch.demo import demo_config
from largebatch.metrics import read_jsonl
from largebatch.models import build_model
from largebatch.trainer import build_optimizer, build_schedule, train


def trainer_rates(config, out: Path) -> list[float]:
    train(config, overwrite=True)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    return [r["img_per_s"] for r in rows[2:]]


def minimal_loop_rates(config, steps: int) -> list[float]:
    """What a user would write by hand: no metrics, no checks, no checkpoints."""
    data = build_dataset("fashion_mnist", root=config.data.root, device=torch.device("cpu"),
                         seed=config.seed, augment=config.data.augment)
    torch.manual_seed(config.seed)
    model = build_model("fmnist_net", 10, **config.model.options).to(memory_format=torch.channels_last)
    opt = build_optimizer(config, model, lr=0.0)
    schedule = build_schedule(config, data.steps_per_epoch(config.batch_size))
    rates, step = [], 0
    while step < steps:
        epoch = step // data.steps_per_epoch(config.batch_size)
        for micro in data.train_batches(epoch, config.batch_size, config.micro_batch, 0, 1):
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = schedule(step)
            opt.zero_grad(set_to_none=True)
            for x, y in micro:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(x.contiguous(memory_format=torch.channels_last))
                (F.cross_entropy(out.float(), y) / len(micro)).backward()
            opt.step()
            rates.append(config.batch_size / (time.perf_counter() - t0))
            step += 1
            if step == steps:
                break
    return rates[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--out", default="docs/benchmarks/trainer_overhead.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        base = demo_config(out=str(run_dir), progress=False)
        epochs = max(1, args.steps // 7)
        config = load_config(None, [("model.name", base.model.name), ("model.options", base.model.options),
                                    ("data.augment", base.data.augment), ("batch_size", base.batch_size),
                                    ("micro_batch", base.micro_batch), ("epochs", epochs), ("optim.lr", base.optim.lr),
                                    ("optim.exclude_bias_and_norm", base.optim.exclude_bias_and_norm),
                                    ("eval_every", 1000), ("progress", False), ("out", str(run_dir)),
                                    ("checkpoint_every", 1000), ("schedule.warmup_epochs", 1.0)])
        trainer, loop = [], []
        for _ in range(args.repeats):
            trainer += trainer_rates(config, run_dir)
            loop += minimal_loop_rates(config, epochs * 7)
    t, m = statistics.median(trainer), statistics.median(loop)
    text = "\n".join([
        "# Trainer overhead",
        "",
        f"Command: `python benchmarks/trainer_overhead.py --repeats {args.repeats} --steps {args.steps}`",
        "",
        f"fmnist_net (width {config.model.options.get('width')}) on Fashion-MNIST, global batch "
        f"{config.batch_size} in micro-batches of {config.micro_batch}, bf16 autocast + channels_last, LARS, "
        f"{torch.get_num_threads()} threads; medians over {len(trainer)} and {len(loop)} steps, "
        f"{args.repeats} alternating runs each.",
        "",
        "| | img/s | steps/s | ratio |",
        "|---|---:|---:|---:|",
        f"| minimal hand-written loop | {m:,.0f} | {m / config.batch_size:.3f} | 1.00 |",
        f"| `largebatch train` | {t:,.0f} | {t / config.batch_size:.3f} | {t / m:.3f} |",
        "",
    ])
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
