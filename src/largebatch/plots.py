"""A finished run's plots, published at once, and a stop signal while they are drawn.

The plots are drawn into a hidden staging directory and moved into ``plots/`` with the stop
signals held back, so ``plots/`` never appears empty or half-written. A stop signal while they
are drawn (the run is already finished and checkpointed, so nothing is lost) ends the command at
once with that signal's exit status and one line saying so; ``--resume auto`` draws them later.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from largebatch import faults, stop_signals
from largebatch.metrics import RunRecordError, write_plots

__all__ = ["PLOT_FILES", "STAGING", "publish_plots"]

STAGING = ".plots.tmp"  # a leftover (a kill while drawing) is removed when the run directory is next opened
PLOT_FILES = ("loss.png", "accuracy.png", "lr.png")  # what write_plots may draw


def publish_plots(run_dir: Path, step: int, rank: int, notice: Callable[[str], None]) -> list[Path]:
    """Draw the plots of ``run_dir`` and put them in ``plots/`` together; a plot that cannot be
    drawn (a full disk, unreadable metrics) is a notice, a stop signal an error (exit 130/143/75)."""
    staging = run_dir / STAGING

    def stop(signum: int, frame: Any) -> None:
        raise stop_signals.plots_stopped(stop_signals.stop_code(signum), run_dir)

    mask: set[signal.Signals] | None = None
    try:
        with stop_signals.installed(stop):
            _remove(staging)
            staging.mkdir()
            faults.maybe_pause("plots", step, rank)
            drawn = write_plots(run_dir, staging)
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals.stop_signal_set())
            return _move_into(staging, run_dir / "plots", drawn)
    except (OSError, RunRecordError) as err:
        notice(f"plots not written: {err}")
        return []
    finally:
        if mask is not None:  # a stop that came while they were moved: the run and its plots are complete
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _remove(staging)


def _move_into(staging: Path, target: Path, drawn: list[Path]) -> list[Path]:
    names = {p.name for p in drawn}
    if names:
        target.mkdir(exist_ok=True)
    for name in names:
        os.replace(staging / name, target / name)
    for name in set(PLOT_FILES) - names:  # not drawn this time (evaluation off): none left from before
        with contextlib.suppress(FileNotFoundError):
            (target / name).unlink()
    return [target / name for name in sorted(names)]


def _remove(staging: Path) -> None:
    if staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging, ignore_errors=True)
