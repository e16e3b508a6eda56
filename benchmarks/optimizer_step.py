"""Time of one optimizer step against torch's SGD in the same run, on two parameter sets.

    python benchmarks/optimizer_step.py [--device cpu|cuda] [--rounds 25] [--out FILE]
                                        [--skip-cold-compile] [--variants]

Parameter sets: ResNet-50's 161 tensors (25.6M fp32 values) and 2,000 tensors of 4,096 values
(the many-small-tensors case, where per-tensor launches dominate). Gradients are fixed. Rounds
are interleaved (one step of each variant per round) so that drift in the machine's speed hits
all variants alike; the figure is the median over rounds, and the ratio is against torch's SGD
(momentum, weight decay) measured in the same rounds: ``fused=True`` on CUDA, ``foreach=True``
on the CPU. The memory floor is 7 passes over the fp32 parameters (read w, g, v; write w, v;
read w, g again for the norms) at the copy bandwidth measured in the same run with a
device-to-device copy. The first-step cost of the compiled path is measured in a fresh process
with an empty compile cache; that of the default path in this process.

Variants: torch SGD (fused on CUDA, foreach), torch Adam (fused on CUDA; foreach on the CPU),
largebatch LARS on each of its paths (default, triton on CUDA, foreach, compiled, single) and
LAMB (default, foreach), timm's Lars when timm is installed. ``--variants`` instead times each
published LARS variant of ``largebatch.optim.VARIANTS`` on its default path (ResNet-50 set only,
momentum 0.9 for all) against torch's SGD, into the section "## LARS variants on DEVICE".
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

from largebatch.optim import LAMB, LARS, VARIANTS, variant

WEIGHT_DECAY = 5e-4
MEMORY_PASSES = 7


def resnet50_tensors(device: torch.device) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().to(device) for p in torchvision.models.resnet50().parameters()]


def small_tensors(device: torch.device) -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(4096, device=device) for _ in range(2000)]


def parameter_copies(base: list[torch.Tensor]) -> Callable[[], list[torch.nn.Parameter]]:
    """A maker of fresh parameter copies of ``base``, all with the same fixed gradients."""
    grads = [torch.randn_like(t) * 1e-3 for t in base]

    def params() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(t.clone()) for t in base]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        return ps

    return params


def make_variants(base: list[torch.Tensor], device: torch.device, full: bool) -> dict[str, torch.optim.Optimizer]:
    """Optimizers over copies of ``base``, each with its own fixed gradients; the first is the baseline."""
    params = parameter_copies(base)
    cuda = device.type == "cuda"
    sgd = dict(lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY)
    lars = dict(lr=0.1, weight_decay=WEIGHT_DECAY)
    variants: dict[str, torch.optim.Optimizer] = {}
    if cuda:
        variants["torch SGD (fused)"] = torch.optim.SGD(params(), **sgd, fused=True)
    variants["torch SGD (foreach)"] = torch.optim.SGD(params(), **sgd, foreach=True)
    if cuda:
        variants["torch Adam (fused)"] = torch.optim.Adam(params(), lr=1e-3, fused=True)
    else:
        variants["torch Adam (foreach)"] = torch.optim.Adam(params(), lr=1e-3, foreach=True)
    variants["largebatch LARS, default"] = LARS(params(), **lars)
    if cuda:
        variants["largebatch LARS, triton"] = LARS(params(), **lars, implementation="triton")
    variants["largebatch LARS, foreach"] = LARS(params(), **lars, implementation="foreach")
    if full:
        variants["largebatch LARS, compiled"] = LARS(params(), **lars, implementation="compiled")
        variants["largebatch LARS, single-tensor"] = LARS(params(), **lars, implementation="single")
    variants["largebatch LAMB, default"] = LAMB(params(), lr=1e-3, weight_decay=WEIGHT_DECAY)
    variants["largebatch LAMB, foreach"] = LAMB(params(), lr=1e-3, weight_decay=WEIGHT_DECAY,
                                                implementation="foreach")
    if full:
        try:
            from timm.optim import Lars as TimmLars

            variants["timm Lars"] = TimmLars(params(), lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY,
                                             trust_coeff=0.001)
        except ImportError:
            print("timm not installed: its Lars is left out", file=sys.stderr)
    return variants


def make_lars_variants(base: list[torch.Tensor], device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """torch's SGD (the baseline), then every published LARS variant on its default path."""
    params = parameter_copies(base)
    fused = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    variants: dict[str, torch.optim.Optimizer] = {
        f"torch SGD ({next(iter(fused))})": torch.optim.SGD(params(), lr=0.1, momentum=0.9,
                                                            weight_decay=WEIGHT_DECAY, **fused)
    }
    for name, spec in VARIANTS.items():
        if spec.optimizer == "LARS":
            variants[f"variant {name}, default"] = variant(name, params(), lr=0.1, momentum=0.9,
                                                           weight_decay=WEIGHT_DECAY)
    return variants


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(
    steps: dict[str, Callable[[], None]], rounds: int, device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            t0 = clock()
            step()
            sync(device)
            times[name].append(clock() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def copy_bandwidth(n_values: int, device: torch.device, rounds: int) -> float:
    """Bytes per second of a device-to-device copy of n_values fp32 values (read + write)."""
    src = torch.randn(n_values, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * 4 * n_values / statistics.median(times[2:])


def first_step_seconds(opt: torch.optim.Optimizer, device: torch.device) -> float:
    """First step minus the median of three later ones: what the path costs before its first update."""
    times = []
    for _ in range(4):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[0] - statistics.median(times[1:])


def cold_first_step_seconds(device: str) -> float:
    """First compiled step in a new process with an empty inductor cache: the compile a user pays."""
    code = (
        "import time, torch, torchvision\n"
        "from largebatch.optim import LARS\n"
        f"ps=[torch.nn.Parameter(p.detach().to('{device}')) for p in torchvision.models.resnet50().parameters()]\n"
        "for p in ps: p.grad=torch.randn_like(p)\n"
        "opt=LARS(ps, lr=0.1, weight_decay=5e-4, implementation='compiled')\n"
        "t=time.perf_counter(); opt.step(); torch.cuda.synchronize() if ps[0].is_cuda else None\n"
        "first=time.perf_counter()-t\n"
        "t=time.perf_counter(); opt.step(); torch.cuda.synchronize() if ps[0].is_cuda else None\n"
        "print(first-(time.perf_counter()-t))\n"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def table(title: str, medians: dict[str, float], floor_s: float | None) -> list[str]:
    base_name = next(iter(medians))
    base = medians[base_name]
    lines = [f"### {title}", "", f"| optimizer | median step (ms) | vs {base_name} |", "|---|---:|---:|"]
    for name, t in medians.items():
        lines.append(f"| {name} | {t * 1e3:.3f} | {t / base:.2f}x |")
    if floor_s is not None:
        lines.append(f"| memory floor ({MEMORY_PASSES} passes at the measured copy bandwidth) | "
                     f"{floor_s * 1e3:.3f} | {floor_s / base:.2f}x |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[3:]),
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds per variant (default: 25)")
    parser.add_argument("--out", default="docs/benchmarks/optimizer_step.md",
                        help="markdown file whose '## Optimizer step on DEVICE' section is replaced "
                             "by this run's tables, other sections kept (default: %(default)s)")
    parser.add_argument("--skip-cold-compile", action="store_true",
                        help="do not measure the compiled path's first step in a fresh process")
    parser.add_argument("--variants", action="store_true",
                        help="time every published LARS variant's default path instead (ResNet-50 set)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall time, or this process's CPU time (user + system), which other "
                             "processes on a shared CPU machine disturb less (default: wall)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("largebatch: error: --device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variants:
        run_variants(args, device)
        return

    compile_s = None if args.skip_cold_compile else cold_first_step_seconds(args.device)
    sections = []
    first_steps: dict[str, float] = {}
    for title, base, full in (
        ("ResNet-50 parameter set (161 tensors, 25.6M fp32 values)", resnet50_tensors(device), True),
        ("2,000 tensors of 4,096 fp32 values", small_tensors(device), False),
    ):
        variants = make_variants(base, device, full)
        if full:
            for name in ("largebatch LARS, default", "largebatch LAMB, default"):
                first_steps[name] = first_step_seconds(variants[name], device)
        steps = {name: opt.step for name, opt in variants.items()}
        for step in steps.values():  # warm-up: allocate state, compile
            step()
            step()
        medians = interleaved_medians(steps, args.rounds, device)
        n_values = sum(t.numel() for t in base)
        floor_s = MEMORY_PASSES * 4 * n_values / copy_bandwidth(n_values, device, args.rounds)
        block = table(title, medians, floor_s)
        print("\n".join(block), flush=True)
        sections += block

    command = f"python benchmarks/optimizer_step.py --device {args.device} --rounds {args.rounds}"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    lines = [
        f"## Optimizer step on {args.device}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {name}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Median of {args.rounds} interleaved rounds.",
        "",
        *sections,
        "First step minus a later one (allocation, kernel compilation): "
        + ", ".join(f"{n}: {s:.2f} s" for n, s in first_steps.items())
        + (f"; compiled path, cold compile cache, fresh process: {compile_s:.1f} s" if compile_s is not None else "")
        + ".",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(Path(args.out), f"## Optimizer step on {args.device}", text)


def run_variants(args: argparse.Namespace, device: torch.device) -> None:
    variants = make_lars_variants(resnet50_tensors(device), device)
    steps = {name: opt.step for name, opt in variants.items()}
    for step in steps.values():  # warm-up: allocate state
        step()
        step()
    clock = time.process_time if args.clock == "process" else time.perf_counter
    medians = interleaved_medians(steps, args.rounds, device, clock)
    command = " ".join(["python", *sys.argv])
    lines = [
        f"## LARS variants on {args.device}",
        "",
        f"Command: `{command}`",
        "",
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Median of {args.rounds} interleaved rounds "
        f"of {'process CPU time' if args.clock == 'process' else 'wall time'}.",
        "",
        *table("ResNet-50 parameter set (161 tensors, 25.6M fp32 values)", medians, None),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    write_section(Path(args.out), f"## LARS variants on {args.device}", text)


def write_section(path: Path, heading: str, text: str) -> None:
    """Put ``text`` in place of the section under ``heading`` in ``path``, keeping the others
    (a CPU run and a GPU run fill their own sections of one file)."""
    old = path.read_text() if path.exists() else "# Optimizer step\n\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + ("" if end < 0 else old[end:])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


if __name__ == "__main__":
    main()
