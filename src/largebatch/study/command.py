"""`largebatch sweep`: argument parsing and the handler, registered by cli.py.

Kept here so that cli.py only lists the command, and free of torch until the command runs (the
config imports it); errors are raised as ConfigError and end, like every other user error, in one
line and exit status 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from largebatch.cli import positive

__all__ = ["print_plan", "register", "run_command"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sweep", help="a batch-size sweep: optimizers x batch sizes x seeds, with a learning-rate search",
        description="Run (or resume) a batch-size sweep from a spec file; every trial is a normal run in "
        "OUT/cells/<optimizer>_b<batch>_lr<lr>_s<seed>/. Finished trials are not recomputed. Writes "
        "OUT/summary.md, summary.csv, trials.csv and top1_vs_batch.png. See docs/study.md.",
    )
    parser.add_argument("--spec", required=True, metavar="FILE.yaml", help="sweep spec (see configs/sweep_fmnist.yaml)")
    parser.add_argument("--out", required=True, metavar="DIR", help="sweep directory (reused to resume)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override a spec key (batch_sizes=[256,1024], seeds=[0], optimizers.sgd.lrs=[0.1]) "
                        "or, for any other key, a trainer key of every trial (epochs=5); repeatable")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and the work they need, then exit")
    parser.add_argument("--img-per-s", type=positive(float), metavar="N",
                        help="with --dry-run: training throughput to turn images into an estimated time")
    parser.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    from largebatch.config import ConfigError
    from largebatch.study.grid import load_spec, parse_spec_override
    from largebatch.study.report import write_report
    from largebatch.study.runner import run_sweep

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("largebatch sweep runs its trials one after another in one process; run it without torchrun")
    spec = load_spec(args.spec, [parse_spec_override(item) for item in args.set])
    if args.dry_run:
        print_plan(spec, args.img_per_s)
        return 0
    out = Path(args.out)
    results = run_sweep(spec, out, on_cell=lambda so_far: write_report(out, spec, so_far))
    paths = write_report(out, spec, results)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def print_plan(spec, img_per_s: float | None) -> None:
    """Cells, iterations per epoch, accumulation and the images every trial trains on."""
    from largebatch.study.grid import Trial
    from largebatch.study.report import batch_label
    from largebatch.study.runner import num_train_examples

    num_train = num_train_examples(spec)
    total_images = 0
    print(f"{'batch':>7} {'iters/epoch':>11} {'micro x accum':>14} {'optimizer':>10} {'trials':>6} {'images':>13}")
    for batch in spec.batch_sizes:
        iters = num_train // batch
        micro = spec.micro_batch(batch)
        for opt in spec.optimizers:
            trials = spec.trials_per_cell(opt.label, batch)
            epochs = spec.trial_config(Trial(opt.label, batch, opt.lrs[batch][0], spec.seeds[0]), "unused").epochs
            images = trials * epochs * iters * batch
            total_images += images
            print(f"{batch_label(batch):>7} {iters:>11} {f'{micro} x {batch // micro}':>14} {opt.label:>10} "
                  f"{trials:>6} {images:>13,}")
    line = f"{spec.total_trials()} trials, {total_images:,} training images (every trial run to the end)"
    if img_per_s:
        line += f", about {total_images / img_per_s / 3600:.2f} h at {img_per_s:,.0f} img/s (evaluation not counted)"
    print(line)
    if spec.extend_search:
        cells = len(spec.batch_sizes) * len(spec.optimizers)
        print(f"extend_search: {spec.extend_search}: each of the {cells} cells may add up to {spec.extend_search} "
              "rate(s) past the edge of its candidates (and its further seeds rerun at a new best), not counted above")
