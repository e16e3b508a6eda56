"""Batch-size sweeps (LARS against the linear-scaling SGD baseline): a grid of trainer runs with a
per-cell learning-rate search, resumable, reported as tables and a plot. See docs/study.md.

Depends on the trainer, config and data floors, never on the command line. Names are imported
on first use, so that `largebatch --help` (which registers the sweep command) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OptimizerSpec": "grid", "SweepSpec": "grid", "Trial": "grid", "build_spec": "grid", "load_spec": "grid",
    "TrialResult": "runner", "run_sweep": "runner", "run_trial": "runner", "select_best": "runner",
    "write_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
