"""Command line: `largebatch train | demo | sweep | plan | bench`.

Every mistake a user can make (a ``UserError``) ends in one line on stderr, ``largebatch: error:
...``, and exit status 2; a diverged run exits 3, a pre-empted one (SIGTERM) 143 after writing its
checkpoint, a run that lost a peer process 4. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Any

from largebatch import __version__
from largebatch.console import write_line
from largebatch.errors import EXIT_LOST_PEER, exit_status, first_line, one_line, printed_on_rank

__all__ = ["EXIT_LOST_PEER", "TRAIN_FLAGS", "add_train_arguments", "build_parser", "main", "positive"]

# plain flags for the common keys: flag -> (dotted key, type, help)
TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "--model": ("model.name", str, "model name (see docs/models_and_data.md)"),
    "--data": ("data.name", str, "dataset: fashion_mnist, imagefolder or synthetic"),
    "--data-dir": ("data.root", str, "dataset directory"),
    "--batch-size": ("batch_size", int, "global batch size (all processes, all accumulation steps)"),
    "--micro-batch": ("micro_batch", int, "per-process micro-batch; accumulation = batch / (world x micro)"),
    "--epochs": ("epochs", int, "epochs to train"),
    "--optimizer": ("optim.name", str, "lars (default), lamb or sgd (linear scaling + warm-up baseline)"),
    "--lr": ("optim.lr", float, "peak learning rate after warm-up (before a scaling rule, if any)"),
    "--warmup-epochs": ("schedule.warmup_epochs", float, "linear warm-up length in epochs"),
    "--out": ("out", str, "run directory"),
    "--seed": ("seed", int, "seed for initialisation, data order and augmentation"),
    "--precision": ("precision", str, "auto, fp32, bf16 or fp16"),
    "--device": ("device", str, "auto (cuda when available), cpu or cuda"),
    "--workers": ("data.options.workers", int, "imagefolder: image-reading worker processes"),
}


def positive(kind: type = int, allow_zero: bool = False):
    """An argparse type: a number of ``kind`` that is > 0 (or >= 0); argparse names the flag."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="a YAML config (see configs/)")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override any config key, dotted (e.g. optim.trust_coefficient=0.002); repeatable")
    for flag, (key, tp, text) in TRAIN_FLAGS.items():
        parser.add_argument(flag, type=tp, dest=key.replace(".", "__"), help=f"{text} [{key}]",
                            metavar=flag.lstrip("-").replace("-", "_").upper())
    parser.add_argument("--resume", metavar="PATH|DIR|auto",
                        help="continue from a checkpoint; from a run directory's newest valid one (the run goes on "
                        "there unless --out names another directory: a fork); auto: from the --out directory's")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in the run directory")
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile [model.compile]")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="largebatch",
        description="Train image classifiers with very large mini-batches (LARS, warm-up, poly decay). "
        "Run under torchrun for several processes or hosts.",
    )
    parser.add_argument("--version", action="version", version=f"largebatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train = sub.add_parser(
        "train", help="train from a config file and overrides",
        description="Train a model. Every config key can be set with --set KEY=VALUE; the common ones "
        "also have flags. Allowed keys: see configs/ and `largebatch train --keys`.",
    )
    add_train_arguments(train)
    train.add_argument("--keys", action="store_true",
                       help="list every config key with its default and what it means, then exit")
    demo = sub.add_parser(
        "demo", help="train the embedded default recipe (Fashion-MNIST, LARS, batch 8192)",
        description="Fashion-MNIST, a small CNN (fmnist_net), LARS at global batch 8192 with warm-up and poly(2) "
        "decay, 40 epochs. --epochs N shortens it (the warm-up shrinks to fit).",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory (a run already there is kept: see --overwrite)")
    demo.add_argument("--overwrite", action="store_true", help="replace a run already in the run directory")
    demo.add_argument("--resume", metavar="PATH|auto", help="continue an interrupted demo run")
    demo.add_argument("--epochs", type=int, help="fewer or more epochs than the recipe's 40")
    demo.add_argument("--data-dir", help="Fashion-MNIST directory")
    demo.add_argument("--no-progress", action="store_true", help="no progress line")
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Any]:
    """Sub-commands that live with their own package (each sets ``args.run``)."""
    from largebatch.plan.cli import add_calibration_parser, add_plan_parser
    from largebatch.study.command import register as register_sweep

    return [register_sweep, add_plan_parser, add_calibration_parser]


def _overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from largebatch.config import parse_override

    pairs = []
    for key, _, _ in TRAIN_FLAGS.values():
        value = getattr(args, key.replace(".", "__"), None)
        if value is not None:
            pairs.append((key, value))
    pairs += [parse_override(item) for item in args.set]
    if args.compile:
        pairs.append(("model.compile", True))
    if args.no_progress:
        pairs.append(("progress", False))
    return pairs


def _print_keys() -> None:
    from largebatch.config import describe_keys

    rows = [(f"{name} = {default!r}", about) for name, default, about in describe_keys()]
    width = max(len(left) for left, _ in rows)
    for left, about in rows:
        print(f"{left:<{width}}  # {about}")


def run_train(args: argparse.Namespace) -> int:
    from largebatch.config import load_config
    from largebatch.trainer import train

    if args.keys:
        _print_keys()
        return 0
    overrides = _overrides(args)
    if args.resume not in (None, "auto") and os.path.isdir(os.path.expanduser(args.resume)) and not any(
            key == "out" for key, _ in overrides):  # --resume DIR alone: that run goes on where it lives
        overrides.append(("out", args.resume))
    config = load_config(args.config, overrides)
    result = train(config, resume=args.resume and os.path.expanduser(args.resume), overwrite=args.overwrite)
    _say_if_already_finished(result)
    return 0


def _say_if_already_finished(result: Any) -> None:
    """A resume with nothing left to train: say so, where the results are and how to train longer
    (here, not in the trainer: a sweep finishing one of its trials has no use for that advice)."""
    from largebatch.rundir import finished_notice

    if result.already_finished and _rank() == 0:
        _message(finished_notice(result.run_dir, result.steps))


def run_demo(args: argparse.Namespace) -> int:
    from largebatch.demo import demo_config
    from largebatch.trainer import train

    config = demo_config(out=args.out, epochs=args.epochs, data_dir=args.data_dir, progress=not args.no_progress)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    _say_if_already_finished(result)
    if _rank() == 0:
        _message(f"run directory: {result.run_dir} ({result.wall_s:.0f} s)")
        if result.top1 is not None:  # None: resumed a finished run, said above
            _message(f"final top-1 accuracy: {result.top1:.2f}%")
    return 0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _message(text: str) -> None:
    """A closing line on stdout, one write; a closed pipe never fails a finished run."""
    from largebatch.metrics import Progress

    Progress(0, enabled=False, is_main=True).message(text)


def main(argv: list[str] | None = None) -> int:
    _fill_closed_standard_descriptors()
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"train": run_train, "demo": run_demo}
    handler = handlers.get(args.command) or args.run
    try:
        if args.command in handlers:
            from largebatch.stop_signals import hold_early

            hold_early()  # a scheduler's warning during start-up is kept, not fatal
        return handler(args)
    except BrokenPipeError:  # `plan --list-hardware | head`: the reader has all it wanted
        if args.command in handlers:
            raise
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as err:
        status = None if os.environ.get("LARGEBATCH_DEBUG") else exit_status(err)
        if status is None:
            raise
        if printed_on_rank(err, _rank()):  # one line, not one per process
            _error(one_line(err))
        return status
    finally:
        if args.command in handlers:
            from largebatch.distributed import shutdown

            shutdown()


def _silence_stdout() -> None:
    """Point a closed standard output at /dev/null, so that the flush at exit raises nothing."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _fill_closed_standard_descriptors() -> None:
    """Started with stdin, stdout or stderr closed (``2>&-``): /dev/null takes its number, so that no
    file the run opens (a checkpoint, the lock) becomes descriptor 2 and receives a library's warnings."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_RDWR)
                if devnull != fd:
                    os.dup2(devnull, fd)
                    os.close(devnull)


def _error(err: object) -> None:
    rank = _rank()
    prefix = f"[rank {rank}] " if rank else ""
    if sys.stderr is None:  # started with stderr closed: the exit status still tells
        return
    with contextlib.suppress(OSError, ValueError):  # stderr broken (its reader gone): likewise
        write_line(sys.stderr, f"largebatch: error: {prefix}{first_line(err)}\n")


if __name__ == "__main__":
    sys.exit(main())
