"""Run records: metrics.jsonl and metrics.csv (+ TensorBoard when installed), plots, a progress line.

Only rank 0 creates a ``MetricsWriter``; other ranks get ``None`` and write nothing. Files are
opened in append mode, so a resumed run continues its records instead of replacing them.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

CSV_COLUMNS = (
    "kind", "step", "epoch", "lr", "loss", "img_per_s", "data_time_s", "elapsed_s",
    "eval_loss", "top1", "top5",
)


class MetricsWriter:
    def __init__(self, run_dir: Path, resume_after_step: int | None = None) -> None:
        self.run_dir = run_dir
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.csv_path = run_dir / "metrics.csv"
        if resume_after_step is not None:
            self._truncate_after(resume_after_step)
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        self._jsonl = self.jsonl_path.open("a")
        self._csv_file = self.csv_path.open("a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new_csv:
            self._csv.writeheader()
        self._tb = _tensorboard(run_dir)

    def _truncate_after(self, step: int) -> None:
        """Drop rows written after the checkpoint we resume from: they will be produced again."""
        rows = read_jsonl(self.jsonl_path) if self.jsonl_path.exists() else []
        kept = [r for r in rows if r.get("step", 0) <= step]
        self.jsonl_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        with self.csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in kept:
                writer.writerow(r)

    def write(self, row: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        self._csv.writerow(row)
        self._csv_file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def close(self) -> None:
        self._jsonl.close()
        self._csv_file.close()
        if self._tb is not None:
            self._tb.close()


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_plots(run_dir: Path) -> list[Path]:
    """loss.png, accuracy.png and lr.png against steps, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    specs = [
        ("loss.png", "loss", [(train, "loss", "train"), (evals, "eval_loss", "eval")]),
        ("accuracy.png", "top-1 accuracy (%)", [(evals, "top1", "eval top-1")]),
        ("lr.png", "learning rate", [(train, "lr", "lr")]),
    ]
    for name, ylabel, series in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for data, key, label in series:
            points = [(r["step"], r[key]) for r in data if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if data is evals else None, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend()
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=100)
        plt.close(fig)
        written.append(plot_dir / name)
    return written


class Progress:
    """One status line on rank 0: epoch, step, lr, loss, img/s and time left."""

    def __init__(self, total_steps: int, enabled: bool, is_main: bool = True, stream: TextIO | None = None) -> None:
        self.total = total_steps
        self.enabled = enabled and is_main  # the progress line
        self.is_main = is_main  # messages (run header, eval results) print on rank 0 regardless
        self._stream = stream
        self._t0 = time.perf_counter()
        self._first_step: int | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout  # looked up late: the caller may redirect stdout

    @property
    def tty(self) -> bool:
        return self.stream.isatty()

    def update(self, step: int, epoch: int, lr: float, loss: float, img_per_s: float) -> None:
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step, self._t0 = step - 1, time.perf_counter()
        done = step - self._first_step
        elapsed = time.perf_counter() - self._t0
        left = elapsed / done * (self.total - step) if done > 0 else math.nan
        line = (
            f"epoch {epoch + 1} step {step}/{self.total} lr {lr:.4g} loss {loss:.4f} "
            f"{img_per_s:,.0f} img/s left {_clock(left)}"
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:d}:{secs:02d}"
