"""The sweep's outputs: one row per (batch, optimizer) cell as CSV and Markdown, every trial as
CSV, and top-1 against batch size (log2 axis, one line per optimizer, min-max over seeds).

Spread over seeds is given both as the sample standard deviation and as the range: with two or
three seeds the range says more plainly how far apart the runs were.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from largebatch.study.grid import SweepSpec, Trial, format_lr, rate_beyond_edge
from largebatch.study.runner import TrialResult, search_cell, select_best

__all__ = [
    "SUMMARY_COLUMNS", "TRIAL_COLUMNS", "batch_label", "describe", "markdown", "plot", "summarize", "write_csv",
    "write_report",
]

SUMMARY_COLUMNS = (
    "batch", "optimizer", "best_lr", "peak_lr", "top1_mean", "top1_std", "top1_min", "top1_max",
    "top1_vs_smallest", "seeds", "seeds_diverged", "lr_trials", "lr_trials_diverged", "best_lr_at_edge",
    "iters_per_epoch", "images_per_epoch", "steps", "wall_s", "cell_wall_s", "status",
)
TRIAL_COLUMNS = tuple(f.name for f in fields(TrialResult))
# an epoch that leaves out more of the training set than this is flagged in the Markdown
DROPPED_WARNING = 0.05


def batch_label(batch: int) -> str:
    return f"{batch // 1024}K" if batch >= 1024 and batch % 1024 == 0 else str(batch)


def summarize(spec: SweepSpec, results: list[TrialResult]) -> list[dict[str, Any]]:
    """One row per cell that has started, in spec order; unfinished cells have status incomplete.

    ``top1_vs_smallest`` is the mean top-1 minus that of the same optimizer at the smallest batch
    of the spec, in points: what the larger batch costs under the same epoch budget.
    """
    by_name = {r.trial.name: r for r in results}
    iters = {r.batch: r.steps_per_epoch for r in results}
    rows = []
    for batch in spec.batch_sizes:
        for opt in spec.optimizers:
            search, complete = search_cell(spec, opt.label, batch, lambda t: by_name.get(t.name))
            if not search:
                continue
            steps_per_epoch = iters[batch]
            row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS, "")
            row.update(
                batch=batch, optimizer=opt.label, iters_per_epoch=steps_per_epoch,
                images_per_epoch=steps_per_epoch * batch, steps=search[0].total_steps,
                lr_trials=len(search), lr_trials_diverged=sum(r.status == "diverged" for r in search),
                status="incomplete",
            )
            if not complete:
                rows.append(row)
                continue
            best = select_best(search)
            if best is None:
                row.update(status="diverged", cell_wall_s=sum(r.wall_s for r in search))
                rows.append(row)
                continue
            wanted = [Trial(opt.label, batch, best.lr, s).name for s in spec.seeds[1:]]
            runs = [best] + [by_name[n] for n in wanted if n in by_name]
            ok = [r.top1 for r in runs if r.status == "ok" and r.top1 is not None]
            tried = [r.lr for r in search]
            row.update(
                best_lr=best.lr, peak_lr=best.peak_lr, top1_mean=statistics.fmean(ok),
                top1_std=statistics.stdev(ok) if len(ok) > 1 else "", top1_min=min(ok), top1_max=max(ok),
                seeds=len(runs), seeds_diverged=len(runs) - len(ok),
                best_lr_at_edge=rate_beyond_edge(tried, best.lr) is not None,  # the search's own edge rule
                wall_s=statistics.fmean(r.wall_s for r in runs),
                cell_wall_s=sum(r.wall_s for r in search) + sum(r.wall_s for r in runs[1:]),
                status="ok" if len(runs) == len(spec.seeds) else "incomplete",
            )
            rows.append(row)
    reference = {r["optimizer"]: r["top1_mean"] for r in rows
                 if r["batch"] == spec.batch_sizes[0] and r["top1_mean"] != ""}
    for row in rows:
        if row["top1_mean"] != "" and row["optimizer"] in reference:
            row["top1_vs_smallest"] = row["top1_mean"] - reference[row["optimizer"]]
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _fmt(value: Any, spec: str = ".2f") -> str:
    return "" if value in ("", None) else format(value, spec)


def describe(spec: SweepSpec) -> str:
    """"model on data, N epochs", from the config every trial shares."""
    opt = spec.optimizers[0]
    batch = spec.batch_sizes[0]
    config = spec.trial_config(Trial(opt.label, batch, opt.lrs[batch][0], spec.seeds[0]), "unused")
    return f"{config.model.name} on {config.data.name}, {config.epochs} epoch{'s' if config.epochs != 1 else ''}"


def markdown(spec: SweepSpec, rows: list[dict[str, Any]], results: list[TrialResult]) -> str:
    seeds = spec.seeds
    lines = [f"# Batch-size sweep: {describe(spec)}", ""]
    per_cell = ", ".join(
        f"{o.label} {_trials_text(spec, o.label)}" for o in spec.optimizers
    )
    diverged = [r for r in results if r.status == "diverged"]
    further = (f"then runs on seed(s) {', '.join(map(str, seeds[1:]))}" if seeds[1:]
               else "is the only run (one seed)")
    extend = (f"while the best is the smallest or largest rate tried, one more rate beyond it runs (at "
              f"most {spec.extend_search} per cell); " if spec.extend_search else "")
    lines += [
        f"Same epoch budget for every batch. Learning-rate search per (optimizer, batch) cell: every "
        f"candidate runs on seed {seeds[0]}; {extend}the best final top-1 (ties: the smaller rate; diverged "
        f"runs never win) {further}. "
        f"Trials per cell: {per_cell}. Trials recorded: {len(results)}, of which {len(diverged)} diverged.",
        "",
        "Top-1 is the final evaluation, in %: mean ± sample standard deviation over seeds, and the "
        "range. The seed that chose the rate is in the mean, which favours the chosen rate slightly. "
        "\"peak lr\" is the rate after warm-up, after each optimizer's scaling rule (schedule.scaling).",
        "",
        f"\"vs {batch_label(spec.batch_sizes[0])}\" is the mean top-1 minus that of the same optimizer "
        f"at batch {spec.batch_sizes[0]}, in points.",
        "",
        f"| batch | iters/epoch | optimizer | best lr | peak lr | top-1 mean ± std | min–max | "
        f"vs {batch_label(spec.batch_sizes[0])} | seeds | lr trials | steps | s/run |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        edge = " †" if row["best_lr_at_edge"] is True else ""
        if row["status"] == "diverged":
            score, spread = "**diverged**", ""
        elif row["top1_mean"] == "":
            score, spread = f"({row['status']})", ""
        else:
            std = f" ± {row['top1_std']:.2f}" if row["top1_std"] != "" else ""
            score = f"{row['top1_mean']:.2f}{std}"
            spread = f"{row['top1_min']:.2f}–{row['top1_max']:.2f}"
            if row["seeds_diverged"]:
                score += f" ({row['seeds_diverged']} of {row['seeds']} seeds diverged)"
            if row["status"] == "incomplete":
                score += " (incomplete)"
        lr_trials = str(row["lr_trials"])
        if row["lr_trials_diverged"]:
            lr_trials += f" ({row['lr_trials_diverged']} diverged)"
        best = format_lr(row["best_lr"]) + edge if row["best_lr"] != "" else ""
        lines.append(
            f"| {row['batch']} | {row['iters_per_epoch']} | {row['optimizer']} | {best} | "
            f"{_fmt(row['peak_lr'], '.4g')} | {score} | {spread} | {_fmt(row['top1_vs_smallest'], '+.2f')} | "
            f"{row['seeds'] or ''} | {lr_trials} | "
            f"{row['steps']} | {_fmt(row['wall_s'], '.1f')} |"
        )
    notes = []
    if any(row["best_lr_at_edge"] is True for row in rows):
        notes.append("† the best rate is the smallest or largest rate tried: the optimum may lie outside the search.")
    seen = set()
    for r in results:
        used = r.steps_per_epoch * r.batch
        if r.batch not in seen and used < (1 - DROPPED_WARNING) * r.num_train:
            seen.add(r.batch)
            notes.append(
                f"Batch {r.batch}: {r.steps_per_epoch} iteration(s) per epoch use {used} of {r.num_train} "
                f"training images ({100 * used / r.num_train:.0f}%); the rest of each epoch is dropped, so "
                "this batch sees fewer images in the same epochs."
            )
    for r in diverged:
        notes.append(f"Diverged: {r.trial.name} at step {r.steps} of {r.total_steps}.")
    if any(r.resumed for r in results):
        notes.append("Some trials were resumed after a stop; their wall time counts only the part after the resume.")
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    lines += ["", "Files: summary.csv (this table), trials.csv (every trial), top1_vs_batch.png.", ""]
    return "\n".join(lines)


def _trials_text(spec: SweepSpec, label: str) -> str:
    counts = sorted({len(spec.optimizer(label).lrs[b]) for b in spec.batch_sizes})
    candidates = "/".join(map(str, counts))
    total = "/".join(str(c + len(spec.seeds) - 1) for c in counts)
    extra = f" + up to {spec.extend_search} rate(s) past an edge" if spec.extend_search else ""
    return f"{total} ({candidates} lr candidate(s) + {len(spec.seeds) - 1} further seed(s){extra})"


def plot(path: Path, spec: SweepSpec, rows: list[dict[str, Any]], results: list[TrialResult]) -> None:
    """Top-1 (mean, bars from min to max over seeds) against batch, log2 axis; diverged cells as x
    at chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    chance = 100.0 / results[0].num_classes if results else None
    for i, opt in enumerate(spec.optimizers):
        color = f"C{i}"
        cells = [r for r in rows if r["optimizer"] == opt.label and r["top1_mean"] != ""]
        if cells:
            x = [r["batch"] for r in cells]
            y = [r["top1_mean"] for r in cells]
            err = [[r["top1_mean"] - r["top1_min"] for r in cells], [r["top1_max"] - r["top1_mean"] for r in cells]]
            ax.errorbar(x, y, yerr=err, color=color, marker="o", capsize=3, label=opt.label)
        bad = [r["batch"] for r in rows if r["optimizer"] == opt.label and r["status"] == "diverged"]
        if bad and chance is not None:
            ax.scatter(bad, [chance] * len(bad), color=color, marker="x", s=60,
                       label=f"{opt.label}: diverged" if not cells else None)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_xticks(spec.batch_sizes, [batch_label(b) for b in spec.batch_sizes])
    ax.minorticks_off()
    ax.set_xlabel("global batch size")
    ax.set_ylabel("final top-1 accuracy (%)")
    ax.set_title(f"{describe(spec)} (bars: min-max over {len(spec.seeds)} seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: str | Path, spec: SweepSpec, results: list[TrialResult]) -> dict[str, Path]:
    """summary.csv, summary.md, trials.csv and top1_vs_batch.png in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(spec, results)
    paths = {
        "csv": out / "summary.csv", "markdown": out / "summary.md",
        "trials": out / "trials.csv", "plot": out / "top1_vs_batch.png",
    }
    write_csv(paths["csv"], rows, SUMMARY_COLUMNS)
    write_csv(paths["trials"], [asdict(r) for r in results], TRIAL_COLUMNS)
    paths["markdown"].write_text(markdown(spec, rows, results))
    plot(paths["plot"], spec, rows, results)
    return paths
