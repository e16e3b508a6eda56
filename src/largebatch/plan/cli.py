"""`largebatch plan` and `largebatch bench`: argument parsers and one handler per command.

`largebatch bench comm|compute` calibrates the planner (:mod:`.calibrate`): it measures this
machine and writes the figures into a hardware file. The project's own speed measurements are
elsewhere, in benchmarks/.

Kept free of heavy imports at module level (torch, matplotlib) so that `largebatch --help` stays
fast; each run function imports what it needs. Errors a user can fix raise PlanError, which the
top-level command line prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
from pathlib import Path

from largebatch.cli import positive
from largebatch.errors import first_line
from largebatch.imagenet_stats import IMAGENET_TRAIN
from largebatch.plan.costs import ALGORITHMS, HIERARCHICAL
from largebatch.plan.errors import PlanError

__all__ = [
    "add_calibration_parser", "add_plan_parser", "parse_processes", "run_calibrate_comm", "run_calibrate_compute",
    "run_plan",
]


def parse_processes(spec: str) -> list[int]:
    """'1:2048' (powers of two from 1 to 2048), '512,1024,2048', or a mix: '2:16,24,48'."""
    out: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if ":" in part:
                lo, hi = (int(x) for x in part.split(":"))
                if lo < 1 or hi < lo:
                    raise ValueError
                p = 1
                while p <= hi:
                    if p >= lo:
                        out.add(p)
                    p *= 2
                out.update({lo, hi})
            else:
                p = int(part)
                if p < 1:
                    raise ValueError
                out.add(p)
        except ValueError:
            hint = "use counts like 1:2048 (powers of two) or 512,1024,2048"
            raise PlanError(f"bad --processes {spec!r}: {hint}") from None
    return sorted(out)


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan",
        help="predict iteration time, time to train and scaling efficiency over process counts",
        description="Scaling planner: alpha-beta-gamma all-reduce costs + compute from FLOPs or measured images/s.",
    )
    p.add_argument("--model", help="alexnet, alexnet_bn, resnet50, a largebatch.models name, or use --params/--flops")
    p.add_argument("--hardware", help="shipped hardware name (see --list-hardware) or a YAML file")
    p.add_argument("--global-batch", type=int, default=32768, help="global mini-batch (default 32768)")
    p.add_argument("--epochs", type=float, default=90, help="epochs (default 90)")
    p.add_argument("--dataset-size", type=int, default=IMAGENET_TRAIN, help="training images (default ImageNet-1k)")
    p.add_argument("--processes", default="1:2048", help="process counts: 1:2048 (powers of two), or 512,1024,2048")
    p.add_argument("--algorithm", default=None, choices=["best", *ALGORITHMS, HIERARCHICAL],
                   help="all-reduce algorithm (default: the hardware file's, else the cheapest per size); "
                   "hierarchical needs a hardware file with a node section")
    p.add_argument("--grad-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of the all-reduced gradients (default fp32; bf16/fp16 halve the bytes)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size in MiB, 0 for one all-reduce")
    p.add_argument("--images-per-s", type=float, help="measured per-process training images/s (overrides FLOP/s)")
    p.add_argument("--sustained-fraction", type=float, help="override the hardware's fraction of peak FLOP/s")
    p.add_argument("--profile-source", default="auto", choices=["auto", "models", "paper"],
                   help="where params/FLOPs come from: largebatch.models, the paper's figures (docs/paper.md), or auto")
    p.add_argument("--params", type=lambda s: int(float(s)), help="parameters, for a model without a profile")
    p.add_argument("--flops", type=float, help="forward FLOPs per image, for a model without a profile")
    p.add_argument("--out", help="directory for plan-<model>-<hardware>.md and .png")
    p.add_argument("--allreduce-table", action="store_true",
                   help="also print every algorithm's all-reduce time, 1 KB to 256 MB, at the largest count")
    p.add_argument("--list-hardware", action="store_true", help="list the shipped hardware files and exit")
    p.set_defaults(run=run_plan)
    return p


def _hardware(args):
    from dataclasses import replace

    from largebatch.plan.hardware import load_hardware

    hw = load_hardware(args.hardware)
    if args.sustained_fraction is not None:
        if hw.peak_flops is None:
            raise PlanError(f"--sustained-fraction needs compute.peak_flops in {args.hardware!r}")
        if not 0 < args.sustained_fraction <= 1:
            raise PlanError(f"--sustained-fraction must be in (0, 1], got {args.sustained_fraction}")
        hw = replace(hw, flops=hw.peak_flops * args.sustained_fraction)
    return hw


def _check_plan_args(args) -> None:
    """Refuse numbers that would print nonsense (negative times, efficiencies above 100%)."""
    if not args.model or not args.hardware:
        raise PlanError("plan needs --model and --hardware (see --list-hardware)")
    if args.global_batch < 1:
        raise PlanError(f"--global-batch must be >= 1, got {args.global_batch}")
    if not (math.isfinite(args.bucket_mb) and args.bucket_mb >= 0):
        raise PlanError(f"--bucket-mb must be a finite number >= 0, got {args.bucket_mb}")
    for flag, value in (("--epochs", args.epochs), ("--images-per-s", args.images_per_s), ("--flops", args.flops)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise PlanError(f"{flag} must be a finite number > 0, got {value}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise PlanError(f"--out {args.out} exists and is not a directory; give a directory for the .md and .png")


def _network_line(hw) -> str:
    def level(net) -> str:
        rate = f"{1 / net.beta / 1e9:.2f} GB/s"
        return f"alpha {net.alpha:.3g} s, beta {net.beta:.3g} s/B ({rate}), gamma {net.gamma:.3g} s/B"

    if hw.node is None:
        return f"- hardware: {hw.description}; {level(hw.network)}"
    return (f"- hardware: {hw.description}; inside a node of {hw.node.per_node}: {level(hw.node.intra)}; "
            f"between nodes: {level(hw.network)}")


def run_plan(args) -> int:
    from largebatch.plan.hardware import list_hardware, load_hardware
    from largebatch.plan.model import resolve_profile
    from largebatch.plan.predict import GRAD_BYTES, predict
    from largebatch.plan.report import allreduce_table, format_seconds, plot, table

    if args.list_hardware:
        for name in list_hardware():
            print(f"{name}: {load_hardware(name).description}")
        return 0
    _check_plan_args(args)
    hw = _hardware(args)
    prof = resolve_profile(args.model, args.profile_source, args.params, args.flops)
    procs = parse_processes(args.processes)
    if procs[-1] > args.global_batch:
        raise PlanError(f"--global-batch {args.global_batch} is smaller than {procs[-1]} processes: some would get "
                        f"no image; give --processes up to {args.global_batch}")
    uneven = [p for p in procs if args.global_batch % p]
    if uneven:
        raise PlanError(f"--global-batch {args.global_batch} does not divide among {', '.join(map(str, uneven))} "
                        f"processes (a process cannot take part of an image); give process counts that divide it")
    if args.global_batch > args.dataset_size:
        raise PlanError(f"--global-batch {args.global_batch} is larger than the data set ({args.dataset_size} images, "
                        "--dataset-size): an epoch would hold no full batch")
    algorithm = args.algorithm or hw.algorithm or "best"
    grad_bytes = GRAD_BYTES[args.grad_dtype]
    preds = predict(prof, hw, procs, args.global_batch, args.epochs, args.dataset_size, algorithm=algorithm,
                    bucket_bytes=args.bucket_mb * 2**20 or None, images_per_s=args.images_per_s,
                    grad_bytes=grad_bytes)
    fit = None if args.images_per_s else hw.step_time.get(prof.name)
    ips = args.images_per_s or hw.images_per_s.get(prof.name)
    if fit is not None:
        fitted_on = f", fitted on batches {','.join(map(str, fit.batches))}" if fit.batches else ""
        compute_from = (f"measured step {fit.fixed_s * 1e3:.3g} ms + {fit.per_image_s * 1e6:.3g} us per image "
                        f"per process{fitted_on}")
    elif ips:
        compute_from = f"measured {ips:g} images/s per process"
    else:
        compute_from = f"{hw.flops:.3g} FLOP/s sustained per process"
    buckets = f"buckets of {args.bucket_mb:g} MiB" if args.bucket_mb else "one all-reduce of all gradients"
    lines = [
        f"# Plan: {prof.name} on {hw.name}",
        "",
        f"- model: {prof.params / 1e6:.1f}M parameters ({prof.params * grad_bytes / 1e6:.0f} MB of "
        f"{args.grad_dtype} gradients), {prof.flops / 1e9:.2f} GFLOP forward per image ({prof.source})",
        _network_line(hw),
        f"- compute: {compute_from}; all-reduce: {algorithm}, {buckets}",
        f"- global batch {args.global_batch}, {args.epochs:g} epochs of {args.dataset_size} images "
        f"= {preds[0].iterations} iterations ({args.dataset_size // args.global_batch} full batches per epoch, "
        "the last partial batch dropped as the trainer does)",
        "",
        table(preds),
    ]
    if args.allreduce_table:
        from largebatch.plan.calibrate import default_sizes

        big = procs[-1]
        lines += ["", f"All-reduce at {big} processes:", "", allreduce_table(big, default_sizes(), hw.links)]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        stem = f"plan-{prof.name}-{hw.name}"
        try:
            png = plot(preds, out / f"{stem}.png", title=f"{prof.name} on {hw.name}, batch {args.global_batch}")
            (out / f"{stem}.md").write_text(text + f"\n\n![time to train and efficiency]({png.name})\n")
        except OSError as err:
            raise PlanError(f"cannot write the plan to {out}: {err.strerror or err}") from None
        fastest = min(preds, key=lambda pr: pr.time_to_train())
        print(f"\nwrote {out / stem}.md and .png; fastest: {fastest.processes} processes, "
              f"{format_seconds(fastest.time_to_train())}", file=sys.stderr)
    return 0


def add_calibration_parser(subparsers) -> argparse.ArgumentParser:
    """The `bench` command (its name kept for users' scripts): calibration of the planner."""
    p = subparsers.add_parser("bench", help="calibrate the planner: all-reduce times, training throughput")
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    sub.required = True
    c = sub.add_parser("comm", help="time all-reduce over sizes among local processes and fit alpha, beta, gamma")
    c.add_argument("--processes", type=positive(int), default=2, help="local processes (default 2)")
    c.add_argument("--min-size", default="1K", help="smallest message (default 1K)")
    c.add_argument("--max-size", default="256M", help="largest message (default 256M); sizes go up by 4x")
    c.add_argument("--fit-min-size", default=None,
                   help="fit only sizes >= this (default: all); for the regime a workload uses, e.g. 4M buckets")
    c.add_argument("--reps", type=positive(int), help="repetitions per size (default: 3 to 40, about 64 MB of traffic)")
    c.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    c.add_argument("--algorithm", default="ring", choices=list(ALGORITHMS),
                   help="closed form to fit (default ring: gloo's CPU all-reduce; NCCL uses ring or tree)")
    c.add_argument("--yaml", help="write or update this hardware YAML with the fitted network")
    c.add_argument("--name", help="hardware name when --yaml creates a new file")
    c.set_defaults(run=run_calibrate_comm)
    m = sub.add_parser("compute", help="measure training images/s of MODEL (forward, backward, SGD step); "
                       "on the GPU when there is one")
    m.add_argument("model", help="a largebatch.models name, else a torchvision model name")
    m.add_argument("--batch", default="32",
                   help="per-process batch, or a list (32,64,256) to fit step time = fixed + batch x per image")
    m.add_argument("--steps", type=positive(int), default=10, help="timed steps (default 10)")
    m.add_argument("--warmup", type=positive(int, allow_zero=True), default=2, help="untimed steps first (default 2)")
    m.add_argument("--threads", type=positive(int),
                   help="torch threads per process (default: torch's choice; cores/N with N)")
    m.add_argument("--processes", type=positive(int), default=1,
                   help="run N copies at once and report the slowest: the per-process rate of an N-process job")
    m.add_argument("--image-size", type=positive(int), help="input side (default: the model's)")
    m.add_argument("--num-classes", type=positive(int), default=1000)
    m.add_argument("--yaml", help="write or update this hardware YAML with compute.images_per_s[MODEL]")
    m.add_argument("--name", help="hardware name when --yaml creates a new file")
    m.set_defaults(run=run_calibrate_compute)
    return p


def _check_yaml_target(path: str) -> None:
    """A --yaml that calibration can update: a new file in a directory that exists, or a hardware YAML."""
    import yaml

    from largebatch.yaml_numbers import load_yaml

    file = Path(os.path.expanduser(path))
    if file.is_dir():
        raise PlanError(f"--yaml {path} is a directory; give a file such as {file / 'this-machine.yaml'}")
    if not file.exists():
        if not file.parent.is_dir():
            raise PlanError(f"--yaml {path}: directory {file.parent} does not exist")
        return
    try:
        data = load_yaml(file.read_text())
    except OSError as err:
        raise PlanError(f"--yaml {path} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise PlanError(f"--yaml {path} is not valid YAML: {first_line(err)}") from None
    if data is not None and not isinstance(data, dict):
        raise PlanError(f"--yaml {path} must hold a hardware mapping, got {type(data).__name__}")


def _comment_lines(text: str) -> list[str]:
    """The whole-line comments of a YAML file, in order (a rewrite keeps them as its header)."""
    return [line.rstrip() for line in text.splitlines() if line.lstrip().startswith("#")]


def _update_yaml(path: str, name: str | None, section: str, values: dict, source: str) -> None:
    """Merge measured values into a hardware YAML; the new source line replaces the one it supersedes."""
    from largebatch.plan.hardware import render_hardware
    from largebatch.yaml_numbers import load_yaml

    file = Path(os.path.expanduser(path))
    data = load_yaml(file.read_text()) if file.exists() else None
    data = data if isinstance(data, dict) else {}
    data.setdefault("name", name or file.stem)
    data.setdefault("description", "this machine, measured with largebatch bench")
    target = data.setdefault(section, {})
    for key, value in values.items():
        if isinstance(value, dict):
            target.setdefault(key, {}).update(value)
        else:
            target[key] = value
    prefix = source.split(":", 1)[0] + ":"
    sources = [s for s in data.get("sources", []) if not s.startswith(prefix)]
    sources.append(source)
    data["sources"] = sources
    data = {k: data[k] for k in ("name", "description", "compute", "network", "node", "sources") if k in data}
    header = "Measured on this machine by `largebatch bench`; see `sources` for the command and date of each figure."
    if file.exists():  # the file's own comments (provenance, the conditions of each figure) stay
        kept = [line[2:] if line.startswith("# ") else line.lstrip("#") for line in _comment_lines(file.read_text())]
        header = "\n".join(kept) if kept else header
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(render_hardware(data, header))
    print(f"updated {file}", file=sys.stderr)


def _start_calibration(args) -> str:
    """Check --yaml before minutes of measuring, not after; return the provenance of what is
    measured next (date, and the load average: other work on the machine slows every measurement)."""
    if args.yaml:
        _check_yaml_target(args.yaml)
    load = os.getloadavg()[0]
    return f"{datetime.date.today().isoformat()}, 1-min load average {load:.2f} on {os.cpu_count()} cores"


def run_calibrate_comm(args) -> int:
    """`largebatch bench comm`: time all-reduces among local processes, fit alpha, beta, gamma."""
    from largebatch.plan import calibrate
    from largebatch.plan.costs import allreduce_time

    today = _start_calibration(args)
    smallest, largest = calibrate.parse_size(args.min_size), calibrate.parse_size(args.max_size)
    if smallest > largest:
        raise PlanError(f"--min-size {args.min_size} is larger than --max-size {args.max_size}")
    sizes = calibrate.default_sizes(smallest, largest)
    lo = calibrate.parse_size(args.fit_min_size) if args.fit_min_size else 0
    if sum(n >= lo for n in sizes) < 2:
        raise PlanError(f"--fit-min-size {args.fit_min_size} leaves fewer than two sizes to fit")
    gamma = calibrate.measure_gamma()
    backend, sizes, times = calibrate.measure_allreduce(args.processes, sizes, args.reps, args.backend)
    used = [(n, t) for n, t in zip(sizes, times, strict=True) if n >= lo]
    net = calibrate.fit_network([n for n, _ in used], [t for _, t in used], args.processes, args.algorithm,
                                gamma).network
    models = [allreduce_time(args.algorithm, args.processes, n, net) for n in sizes]
    errors = [m / t - 1 for m, t in zip(models, times, strict=True)]
    worst = max(abs(e) for e in errors)
    print(f"all-reduce, {args.processes} processes, {backend}, fitted as {args.algorithm}:")
    print("| bytes | measured | model | GB/s (n / t) | model error |")
    print("|---|---|---|---|---|")
    for n, t, m, e in zip(sizes, times, models, errors, strict=True):
        print(f"| {n} | {t * 1e3:.3f} ms | {m * 1e3:.3f} ms | {n / t / 1e9:.2f} | {e:+.0%} |")
    print(f"alpha = {net.alpha:.3g} s, beta = {net.beta:.3g} s/B ({1 / net.beta / 1e9:.2f} GB/s), "
          f"gamma = {net.gamma:.3g} s/B (local a += b), largest model error {worst:.0%}")
    if args.yaml:
        cmd = (f"largebatch bench comm --processes {args.processes} --min-size {args.min_size} "
               f"--max-size {args.max_size}" + (f" --fit-min-size {args.fit_min_size}" if lo else ""))
        _update_yaml(args.yaml, args.name, "network",
                     {"alpha": float(f"{net.alpha:.4g}"), "beta": float(f"{net.beta:.4g}"),
                      "gamma": float(f"{net.gamma:.4g}"), "algorithm": args.algorithm,
                      "processes": args.processes},
                     f"network: `{cmd}` ({backend}, {today}); weighted least squares on the {args.algorithm} "
                     f"form; gamma from a timed local a += b; largest model error {worst:.0%}")
    return 0


def run_calibrate_compute(args) -> int:
    """`largebatch bench compute`: time training steps of a model; one batch gives images/s,
    several fit step time = fixed + batch x per image."""
    from largebatch.plan import calibrate

    today = _start_calibration(args)
    batches = calibrate.parse_batches(args.batch)
    if args.steps < 1:
        raise PlanError(f"--steps must be >= 1, got {args.steps}")
    if args.processes < 1:
        raise PlanError(f"--processes must be >= 1, got {args.processes}")
    model, shape = calibrate.resolve_model(args.model, args.num_classes, args.image_size)
    device = calibrate.calibration_device()
    model = model.to(device)
    where = f"{device.type}" + (f" ({calibrate.device_name(device)}, bf16 autocast, channels_last)"
                                if device.type == "cuda" else "")
    steps = []
    for batch in batches:
        if args.processes == 1:
            step = calibrate.measure_compute(model, shape, batch, args.steps, args.warmup, args.threads,
                                             args.num_classes)
        else:
            step = calibrate.measure_compute_concurrent(args.model, args.processes, batch, args.steps, args.warmup,
                                                        args.threads, args.num_classes, args.image_size)
        steps.append(step)
        print(f"{args.model}: batch {batch}, input {'x'.join(map(str, shape))}, {args.processes} process(es) at "
              f"once on {where}, median step {step * 1e3:.2f} ms, {batch / step:.1f} images/s per process")
    threads = f" --threads {args.threads}" if args.threads else ""
    threads += f" --processes {args.processes}" if args.processes > 1 else ""
    cmd = f"largebatch bench compute {args.model} --batch {','.join(map(str, batches))}{threads}"
    if len(set(batches)) < 2:
        ips = batches[0] / steps[0]
        if args.yaml:
            _update_yaml(args.yaml, args.name, "compute", {"images_per_s": {args.model: float(f"{ips:.4g}")}},
                         f"compute.images_per_s.{args.model}: `{cmd}` on {where} ({today}), "
                         f"median of {args.steps} steps")
        return 0
    fit, residuals = calibrate.fit_step_time(batches, steps)
    worst = max(abs(r) for r in residuals)
    print(f"step time = {fit.fixed_s * 1e3:.3f} ms + batch x {fit.per_image_s * 1e6:.2f} us "
          f"(least squares; largest model error {worst:.0%})")
    if args.yaml:
        entry = {"fixed_s": float(f"{fit.fixed_s:.4g}"), "per_image_s": float(f"{fit.per_image_s:.4g}"),
                 "batches": list(batches)}
        _update_yaml(args.yaml, args.name, "compute", {"step_time": {args.model: entry}},
                     f"compute.step_time.{args.model}: `{cmd}` on {where} ({today}), median of {args.steps} "
                     f"steps per batch; least squares, largest model error {worst:.0%}")
    return 0
