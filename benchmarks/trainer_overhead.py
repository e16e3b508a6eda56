"""Trainer overhead: `largebatch train` against a minimal hand-written loop, same model, data, batch.

    python benchmarks/trainer_overhead.py [--repeats 3] [--steps 14]
    python benchmarks/trainer_overhead.py --device cuda --model resnet50 --data synthetic --batch 256 [--compile]

Default (CPU): the demo's recipe (fmnist_net width 16, Fashion-MNIST, global batch 8192 in
micro-batches of 128, bf16 autocast where the CPU has it + channels_last, LARS). With
``--model``/``--data``/``--batch``: that model on that data, one micro-batch per step, the
run's default precision (bf16 autocast on CUDA), LARS, cudnn autotuning on.

Both sides run in the same process, alternating ``--repeats`` times. The trainer's figure is
its own logged img/s (which excludes evaluation and checkpoint writes, as a loop would); the
loop is timed over the same windows of steps, with one device synchronisation per window, as
the trainer's log steps have. On CUDA the trainer runs twice per repeat, with CUDA graphs off
and on. Medians over windows; each run's first windows are dropped (warm-up, autotuning,
compilation, graph capture).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from largebatch.config import TrainConfig, load_config
from largebatch.data import build_dataset
from largebatch.demo import demo_config
from largebatch.metrics import read_jsonl
from largebatch.models import build_model, default_input_size
from largebatch.trainer import autocast_dtype, build_optimizer, build_schedule, train

WARMUP_WINDOWS = 2


def demo_recipe(run_dir: Path, steps: int, device: str) -> TrainConfig:
    base = demo_config(out=str(run_dir), progress=False)
    epochs = max(1, steps // 7)
    return load_config(None, [("model.name", base.model.name), ("model.options", base.model.options),
                              ("data.augment", base.data.augment), ("batch_size", base.batch_size),
                              ("micro_batch", base.micro_batch), ("epochs", epochs), ("optim.lr", base.optim.lr),
                              ("optim.exclude_bias_and_norm", base.optim.exclude_bias_and_norm),
                              ("eval_every", 0), ("progress", False), ("out", str(run_dir)), ("device", device),
                              ("checkpoint_every", 10**6), ("schedule.warmup_epochs", 1.0)])


def model_recipe(args: argparse.Namespace, run_dir: Path) -> TrainConfig:
    """One epoch of exactly ``steps`` steps of ``--batch``; synthetic data sized to it."""
    overrides: list[tuple[str, object]] = [
        ("model.name", args.model), ("data.name", args.data), ("batch_size", args.batch),
        ("micro_batch", args.batch), ("epochs", 1), ("eval_every", 0), ("progress", False),
        ("out", str(run_dir)), ("device", args.device), ("checkpoint_every", 10**6), ("log_every", args.window),
        ("model.compile", args.compile), ("data.augment", False),
    ]
    if args.data == "synthetic":
        side = default_input_size(args.model)
        channels = 3 if side >= 64 else 1
        overrides.append(("data.options", {"shape": [channels, side, side], "num_classes": 1000 if side >= 64 else 10,
                                           "num_train": args.batch * args.steps, "num_eval": 0}))
    if args.data_dir:
        overrides.append(("data.root", args.data_dir))
    return load_config(None, overrides)


def trainer_rates(config: TrainConfig, out: Path, cuda_graphs: str | None = None) -> list[float]:
    if cuda_graphs is not None:
        config.cuda_graphs = cuda_graphs
    train(config, overwrite=True)
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    return [r["img_per_s"] for r in rows[WARMUP_WINDOWS:]]


def minimal_loop_rates(config: TrainConfig, steps: int, window: int) -> list[float]:
    """What a user would write by hand: no metrics, no checks, no checkpoints."""
    device = torch.device("cuda" if config.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = build_dataset(config.data.name, root=config.data.root, device=device, seed=config.seed,
                         augment=config.data.augment, **config.data.options)
    torch.manual_seed(config.seed)
    model = build_model(config.model.name, data.num_classes, **config.model.options)
    model = model.to(device, memory_format=torch.channels_last)
    runner = torch.compile(model) if config.model.compile else model
    opt = build_optimizer(config, model, lr=0.0)
    spe = data.steps_per_epoch(config.batch_size)
    schedule = build_schedule(config, spe)
    amp = autocast_dtype(config.precision, device)
    rates, step, t0 = [], 0, time.perf_counter()
    while step < steps:
        for micro in data.train_batches(step // spe, config.batch_size, config.micro_batch or config.batch_size, 0, 1):
            for g in opt.param_groups:
                g["lr"] = schedule(step)
            opt.zero_grad(set_to_none=True)
            for x, y in micro:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    out = runner(x.contiguous(memory_format=torch.channels_last))
                (F.cross_entropy(out.float(), y) / len(micro)).backward()
            opt.step()
            step += 1
            if step % window == 0:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                rates.append(window * config.batch_size / (now - t0))
                t0 = now
            if step == steps:
                break
    return rates[WARMUP_WINDOWS:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default: 14 demo, 60 --model)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", help="a registry model (default: the demo's recipe)")
    parser.add_argument("--data", default="synthetic", help="with --model: synthetic, fashion_mnist or imagefolder")
    parser.add_argument("--data-dir", help="with --model: the dataset directory")
    parser.add_argument("--batch", type=int, default=256, help="with --model: global batch = micro-batch")
    parser.add_argument("--window", type=int, default=10, help="with --model: steps per timed window (log_every)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model on both sides")
    parser.add_argument("--out", default="docs/benchmarks/trainer_overhead.md")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("largebatch: error: --device cuda: no CUDA device here")
    steps = args.steps or (60 if args.model else 14)
    args.steps = steps
    graph_modes = ["off", "on"] if args.device == "cuda" else [None]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        if args.model:
            config, window = model_recipe(args, run_dir), args.window
        else:
            config, window = demo_recipe(run_dir, steps, args.device), 1
            if args.compile:
                config.model.compile = True
        loop_steps = config.epochs * (steps if args.model else 7)
        trainer: dict[str | None, list[float]] = {mode: [] for mode in graph_modes}
        loop: list[float] = []
        for _ in range(args.repeats):
            for mode in graph_modes:
                trainer[mode] += trainer_rates(config, run_dir, mode)
            loop += minimal_loop_rates(config, loop_steps, window)
    m = statistics.median(loop)
    what = (f"{config.model.name} on {config.data.name}, global batch {config.batch_size} in micro-batches of "
            f"{config.micro_batch}, autocast {autocast_dtype(config.precision, torch.device(args.device)) or 'off'}"
            f" + channels_last, LARS{', torch.compile' if config.model.compile else ''}")
    threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else f", {torch.cuda.get_device_name()}"
    command = " ".join(["python", "benchmarks/trainer_overhead.py", *sys.argv[1:]])
    rows = [f"| minimal hand-written loop | {m:,.0f} | {m / config.batch_size:.3f} | 1.00 |"]
    for mode, rates in trainer.items():
        t = statistics.median(rates)
        label = "`largebatch train`" + (f", cuda_graphs={mode}" if mode else "")
        rows.append(f"| {label} | {t:,.0f} | {t / config.batch_size:.3f} | {t / m:.3f} |")
    counts = " and ".join(str(len(r)) for r in (*trainer.values(), loop))
    text = "\n".join([
        "# Trainer overhead",
        "",
        f"Command: `{command}`",
        "",
        f"{what}{threads}, torch {torch.__version__}; medians over {counts} windows of {window} step(s), "
        f"{args.repeats} alternating runs each, the first {WARMUP_WINDOWS} windows of each run dropped.",
        "",
        "| | img/s | steps/s | ratio |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ])
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
