"""Run records: metrics.jsonl and metrics.csv (+ TensorBoard when installed), plots, a progress line.

Only rank 0 creates a ``MetricsWriter``; other ranks get ``None`` and write nothing. Files are
opened in append mode, so a resumed run continues its records instead of replacing them.
Records and the terminal are secondary to training: a failed write (a full disk, a closed pipe)
is recorded or silenced, never raised in the middle of a step, and never leaves a torn line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from largebatch.console import write_line
from largebatch.errors import UserError

CSV_COLUMNS = (
    "kind", "step", "epoch", "lr", "loss", "img_per_s", "data_time_s", "elapsed_s",
    "eval_loss", "top1", "top5",
)


class RunRecordError(UserError, ValueError):
    """metrics.jsonl or metrics.csv cannot be written or read back; the message names the file."""


def _append(fd: int, data: bytes) -> None:
    """Write all of ``data`` at the end of the file (``os.write`` may write part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _csv_line(row: dict[str, Any]) -> str:
    buffer = io.StringIO()
    csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(row)
    return buffer.getvalue()


class MetricsWriter:
    """Appends one row per log step to metrics.jsonl and metrics.csv.

    A write that fails (no space left, say) is undone, so no torn line stays behind, and
    kept in ``error``; later rows are dropped. The trainer reads ``error`` at its next log step
    and stops the run there with a checkpoint, instead of dying in the middle of a step.
    """

    def __init__(self, run_dir: Path, resume_after_step: int | None = None,
                 notice: Callable[[str], None] | None = None) -> None:
        self.run_dir = run_dir
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.csv_path = run_dir / "metrics.csv"
        self.error: str | None = None
        self._notice = notice
        try:
            if resume_after_step is not None:
                self._truncate_after(resume_after_step)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            self._jsonl = os.open(self.jsonl_path, flags, 0o644)
            self._csv = os.open(self.csv_path, flags, 0o644)
            if os.fstat(self._csv).st_size == 0:
                _append(self._csv, (",".join(CSV_COLUMNS) + "\r\n").encode())
        except OSError as err:
            raise RunRecordError(f"cannot write the run records in {run_dir}: {err.strerror or err}") from None
        self._tb = _tensorboard(run_dir)

    def _truncate_after(self, step: int) -> None:
        """Drop rows written after the checkpoint we resume from: they will be produced again.

        Each file is cut at its first row past ``step`` (one ``truncate``, which a kill cannot
        leave half done) and never rewritten, so the rows before it stay whatever happens; each
        file keeps its own rows, so a missing metrics.jsonl never empties metrics.csv.
        """
        rows: list[dict[str, Any]] = []
        if self.jsonl_path.exists():
            rows = read_jsonl(self.jsonl_path, notice=self._notice)  # a bad row: an error; a torn last one: a notice
            _cut_at(self.jsonl_path, _jsonl_offset_after(self.jsonl_path.read_bytes(), step))
        csv_data = self.csv_path.read_bytes() if self.csv_path.exists() else None
        # never silently start the history mid-run; but a run stopped before its first log step wrote
        # no row in either file (with metrics.csv missing too, nobody can tell: say it)
        csv_has_rows = csv_data is None or len(csv_data.splitlines()) > 1  # more than its header
        if step > 0 and not rows and csv_has_rows and self._notice is not None:
            state = "is empty" if self.jsonl_path.exists() else "is missing"
            self._notice(f"{self.jsonl_path} {state}: its rows up to step {step} are lost"
                         + (f" ({self.csv_path.name} keeps its own)" if csv_data is not None else ""))
        if csv_data is not None:
            _cut_at(self.csv_path, _csv_offset_after(csv_data, step))

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` to both files, whole or not at all; a failure goes to ``error``."""
        if self.error is not None:
            return
        for fd, path, text in ((self._jsonl, self.jsonl_path, json.dumps(row) + "\n"),
                               (self._csv, self.csv_path, _csv_line(row))):
            size = os.fstat(fd).st_size
            try:
                _append(fd, text.encode())
            except OSError as err:
                self.error = f"cannot write {path}: {err.strerror or err}"
                try:
                    os.ftruncate(fd, size)  # never leave half a line
                except OSError:
                    self.error += " (a torn last line is dropped on resume)"
                return
        if self._tb is not None:
            try:
                for key, value in row.items():
                    if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                        self._tb.add_scalar(f"{row['kind']}/{key}", value, row["step"])
            except OSError:
                self._tb = None  # optional: TensorBoard stops, the run and its own records go on

    def close(self) -> None:
        for fd in (self._jsonl, self._csv):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self._tb is not None:
            with contextlib.suppress(OSError):
                self._tb.close()


def _cut_at(path: Path, offset: int | None) -> None:
    if offset is not None:
        os.truncate(path, offset)


def _jsonl_offset_after(data: bytes, step: int) -> int | None:
    """Byte offset of the first line past ``step`` (or the torn last line); None to keep all."""
    offset = 0
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line) if line.strip() else {}
            if not isinstance(row, dict):
                raise ValueError
        except ValueError:  # only the last line can be torn here: read_jsonl has checked the others
            return offset
        if not line.endswith(b"\n") or _step(row.get("step")) > step:
            return offset
        offset += len(line)
    return None


def _csv_offset_after(data: bytes, step: int) -> int | None:
    """Byte offset of the first CSV row past ``step`` (the header stays); None to keep all."""
    offset = 0
    for i, line in enumerate(data.splitlines(keepends=True)):
        fields = next(csv.reader([line.decode(errors="replace")]), [])
        if i > 0 and (not line.endswith(b"\n") or len(fields) < 2 or _step(fields[1]) > step):
            return offset
        offset += len(line)
    return None


def _step(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf  # a row without a readable step is not kept past a resume point


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def read_jsonl(path: str | Path, notice: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A torn last line (a crash or a full disk mid-write) is
    dropped with a notice; a bad line anywhere else is an error naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise RunRecordError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    rows = []
    for i, line in numbered:
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if i == numbered[-1][0]:
                if notice is not None:
                    notice(f"{path}: dropped a torn last line (line {i}, from an interrupted write)")
                break
            raise RunRecordError(f"{path} line {i} is not a metrics row ({err}); remove that line") from None
        rows.append(row)
    return rows


def write_plots(run_dir: Path, plot_dir: Path | None = None) -> list[Path]:
    """loss.png, accuracy.png and lr.png against steps, from metrics.jsonl (into ``plot_dir``, default plots/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("kind") == "train"]  # rows of another kind (or none) are not plotted
    evals = [r for r in rows if r.get("kind") == "eval"]
    plot_dir = plot_dir or run_dir / "plots"
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
        if not ax.has_data():  # evaluation off: no empty accuracy plot
            plt.close(fig)
            (plot_dir / name).unlink(missing_ok=True)  # nor one left from a run this one resumed
            continue
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=100)
        plt.close(fig)
        written.append(plot_dir / name)
    return written


RATE_STEPS = 10  # the progress line's img/s: a moving average over about this many updates


class Progress:
    """One status line on rank 0: epoch, step, lr, loss, img/s and time left.

    On a terminal the line is redrawn in place at every update; elsewhere (a log file, a pipe)
    it is printed as a new line about ``lines`` times over the run, not at every step. Output
    that cannot be written (the reader of a pipe went away) is dropped: it never stops training.
    """

    def __init__(self, total_steps: int, enabled: bool, is_main: bool = True, stream: TextIO | None = None,
                 lines: int = 100) -> None:
        self.total = total_steps
        self.enabled = enabled and is_main  # the progress line
        self.is_main = is_main  # messages (run header, eval results) print on rank 0 regardless
        self.lines = lines
        self._stream = stream
        self._t0 = time.perf_counter()
        self._first_step: int | None = None
        self._last_printed: int | None = None
        self._closed = False
        self._rate: float | None = None

    @property
    def stream(self) -> TextIO | None:
        return self._stream or sys.stdout  # looked up late: the caller may redirect stdout (None: closed)

    @property
    def tty(self) -> bool:
        try:
            return self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def update(self, step: int, epoch: int, lr: float, loss: float, img_per_s: float) -> None:
        if not self.enabled:
            return
        # the rate of one log interval jumps (a step that waited for data, then one that did not);
        # the line shows an exponential moving average over about the last RATE_STEPS updates
        if math.isfinite(img_per_s):
            alpha = 2 / (RATE_STEPS + 1)
            self._rate = img_per_s if self._rate is None else self._rate + alpha * (img_per_s - self._rate)
        img_per_s = self._rate if self._rate is not None else img_per_s
        if self._first_step is None:
            # time left is measured from the first update on, which excludes start-up costs;
            # until a second update there is no rate to extrapolate from
            self._first_step, self._t0 = step, time.perf_counter()
        done = step - self._first_step
        elapsed = time.perf_counter() - self._t0
        left = elapsed / done * (self.total - step) if done > 0 else math.nan
        line = (
            f"epoch {epoch + 1} step {step}/{self.total} lr {lr:.4g} loss {loss:.4f} "
            f"{img_per_s:,.0f} img/s left {_clock(left)}"
        )
        if self.tty:
            self._emit("\r" + line.ljust(100))
        elif self._line_due(step):
            self._last_printed = step
            self._emit(line + "\n")

    def _line_due(self, step: int) -> bool:
        """On a non-terminal: the first update, the last step, and one line per ``total / lines`` steps."""
        every = max(1, math.ceil(self.total / max(1, self.lines)))
        last = self._last_printed
        return last is None or step >= self.total or step // every > last // every

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.enabled and self.tty:
            self._emit("\r" + " " * 100 + "\r")
        self._emit(text + "\n")

    def _emit(self, text: str) -> None:
        if self._closed or self.stream is None:  # started with standard output closed: nowhere to write
            return
        try:
            write_line(self.stream, text)  # one write(2): ranks' lines never merge
        except (OSError, ValueError):  # BrokenPipeError, a closed file, EIO from a lost terminal
            self._closed = True
            _silence(self.stream)


def _silence(stream: TextIO) -> None:
    """Point a dead standard output at /dev/null, so that later prints and the flush at exit pass."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if stream is sys.__stdout__ or stream is sys.stdout:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:d}:{secs:02d}"
