"""Presenting predictions: a plain-text table and a PNG of time to train and efficiency vs processes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from largebatch.plan.costs import ALGORITHMS, Network, allreduce_time, best_algorithm
from largebatch.plan.predict import TrainingPrediction

__all__ = ["allreduce_table", "format_seconds", "plot", "table"]


def format_seconds(s: float) -> str:
    """Human scale: us, ms, s, min or h."""
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def table(preds: Sequence[TrainingPrediction]) -> str:
    """A Markdown table: one row per process count."""
    head = ("| processes | batch/proc | iterations | compute | comm | algorithm | iter serial | iter overlap "
            "| train serial | train overlap | eff serial | eff overlap |")
    rows = [head, "|" + "---|" * 12]
    for pr in preds:
        it = pr.iteration
        rows.append(
            f"| {it.processes} | {it.per_process_batch:g} | {pr.iterations} | {format_seconds(it.compute_s)} "
            f"| {format_seconds(it.comm_s)} | {it.algorithm} | {format_seconds(it.serial_s)} "
            f"| {format_seconds(it.overlap_s)} | {format_seconds(pr.time_to_train())} "
            f"| {format_seconds(pr.time_to_train(True))} | {it.efficiency():.0%} | {it.efficiency(True):.0%} |"
        )
    return "\n".join(rows)


def allreduce_table(processes: int, sizes: Sequence[float], net: Network) -> str:
    """All-reduce time of every algorithm per size, and the cheapest."""
    names = list(ALGORITHMS)
    rows = ["| bytes | " + " | ".join(names) + " | best |", "|" + "---|" * (len(names) + 2)]
    for n in sizes:
        cells = [format_seconds(allreduce_time(a, processes, n, net)) for a in names]
        rows.append(f"| {int(n)} | " + " | ".join(cells) + f" | {best_algorithm(processes, n, net)[0]} |")
    return "\n".join(rows)


def plot(preds: Sequence[TrainingPrediction], path: str | Path, title: str = "") -> Path:
    """Two panels against processes (log 2): time to train (minutes) and scaling efficiency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    procs = [pr.processes for pr in preds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(procs, [pr.time_to_train() / 60 for pr in preds], "o-", label="no overlap")
    ax1.plot(procs, [pr.time_to_train(True) / 60 for pr in preds], "s--", label="overlap")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("processes")
    ax1.set_ylabel("time to train (min)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend()
    ax2.plot(procs, [pr.iteration.efficiency() for pr in preds], "o-", label="no overlap")
    ax2.plot(procs, [pr.iteration.efficiency(True) for pr in preds], "s--", label="overlap")
    ax2.set_xscale("log", base=2)
    ax2.set_ylim(0, 1.05)
    ax2.set_xlabel("processes")
    ax2.set_ylabel("scaling efficiency T(1) / (p T(p))")
    ax2.grid(True, alpha=0.3)
    ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
