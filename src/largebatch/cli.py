"""Command line: `largebatch train | demo | sweep | plan | bench`."""

from __future__ import annotations

import argparse
import sys

from largebatch import __version__
from largebatch.plan.cli import add_bench_parser, add_plan_parser
from largebatch.plan.errors import PlanError


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="largebatch",
        description="Train image classifiers with very large mini-batches (LARS, warm-up, poly decay).",
    )
    parser.add_argument("--version", action="version", version=f"largebatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("demo", help="train the embedded default recipe (Fashion-MNIST, LARS, batch 8192)")
    add_plan_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            raise UserError("the demo needs the trainer, which is not built yet; nothing was trained")
        if args.command in ("plan", "bench"):
            return args.run(args)
    except (UserError, PlanError) as err:
        print(f"largebatch: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
