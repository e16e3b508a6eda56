"""The signals that stop a run at its next step boundary, and the error each one ends in.

- SIGTERM (``scancel``, pre-emption, a time limit, ``kill``): checkpoint, exit 143.
- SIGINT (Ctrl-C): checkpoint, exit 130; a second Ctrl-C stops at once, without one.
- the requeue signal (SIGUSR1 unless ``LARGEBATCH_REQUEUE_SIGNAL`` names another), which a
  scheduler sends ahead of a time limit (Slurm's ``--signal``): checkpoint, exit 75, on which
  the job script requeues the job (examples/slurm/).

Each signal has a code; ranks agree on the largest (see ``distributed.any_rank_max``), so a user's
Ctrl-C wins over a scheduler's stop, and a stop wins over a requeue.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from largebatch.errors import EXIT_REQUEUE, Interrupted, Preempted, RequeueRequested, UserError

__all__ = ["REQUEUE_SIGNAL_ENV", "StopCode", "hold_early", "installed", "interrupted_now", "plots_stopped",
           "requeue_signal", "stop_code", "stop_signal_set", "stopped_error"]

REQUEUE_SIGNAL_ENV = "LARGEBATCH_REQUEUE_SIGNAL"


class StopCode:
    NONE, REQUEUE, TERM, INT = 0, 1, 2, 3


def requeue_signal(env: dict[str, str] | None = None) -> signal.Signals:
    """The scheduler's warning signal: USR1, or the one named by LARGEBATCH_REQUEUE_SIGNAL."""
    name = (env if env is not None else os.environ).get(REQUEUE_SIGNAL_ENV, "USR1").strip().upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    allowed = ("SIGUSR1", "SIGUSR2", "SIGHUP", "SIGALRM", "SIGCONT", "SIGURG", "SIGXCPU")
    if name not in allowed:
        raise UserError(f"{REQUEUE_SIGNAL_ENV}={name.removeprefix('SIG')!r} is not a warning signal the trainer "
                        f"can catch; use one of {', '.join(a.removeprefix('SIG') for a in allowed)}")
    return signal.Signals[name]


def stop_code(signum: int | None) -> int:
    """The code of the signal that asked for a stop (SIGTERM's for a stop asked without one)."""
    if signum == signal.SIGINT:
        return StopCode.INT
    if signum is not None and signum not in (signal.SIGTERM,) and signum == requeue_signal():
        return StopCode.REQUEUE
    return StopCode.TERM


_early: list[int] = []  # requeue signals that arrived before a run installed its handlers


def _record_early(signum: int, frame: Any) -> None:
    _early.append(signum)


def hold_early() -> None:
    """Catch the requeue signal from the very start of the command (its default action kills).

    Slurm's warning can arrive while the process is still importing torch or building the model;
    it is kept and handed to the run's handler as soon as :func:`installed` puts that in place.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(requeue_signal(), _record_early)


def stop_signal_set() -> set[signal.Signals]:
    """The signals that stop a run: SIGTERM, SIGINT and the requeue signal."""
    return {signal.SIGTERM, signal.SIGINT, requeue_signal()}


@contextlib.contextmanager
def installed(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for SIGTERM, SIGINT and the requeue signal while the block runs, then the previous ones.

    Only the main thread can install handlers; elsewhere (a sweep's worker thread) nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = stop_signal_set()
    previous = {s: signal.signal(s, handler) for s in signals}
    while _early:  # a warning that came during start-up asks for the stop now
        handler(_early.pop(0), None)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def _continue(run_dir: Path) -> str:
    return f"continue with the same command and --resume auto (run directory {run_dir})"


def stopped_error(code: int, step: int, run_dir: Path) -> Preempted:
    """The error a run ends in after the checkpoint of ``step`` was written on a stop."""
    where = f"checkpoint written at step {step} in {run_dir}"
    if code == StopCode.INT:
        return Interrupted(f"interrupted (Ctrl-C); {where}; {_continue(run_dir)}")
    if code == StopCode.REQUEUE:
        name = requeue_signal().name
        return RequeueRequested(f"stopped by {name} (the scheduler's warning); {where}; exit {EXIT_REQUEUE} "
                                "asks the job script to requeue the job, which continues with --resume auto")
    return Preempted(f"stopped by SIGTERM; {where}; {_continue(run_dir)}")


def interrupted_now(step: int, run_dir: Path, last_checkpoint: Path | None) -> Interrupted:
    """The error of a second Ctrl-C: no checkpoint of this step; say which one the run continues from."""
    if last_checkpoint is None:
        return Interrupted(f"interrupted (second Ctrl-C) at step {step}, before any checkpoint of this run was "
                           f"written; it starts again from step 0 with --resume auto (run directory {run_dir})")
    return Interrupted(f"interrupted (second Ctrl-C) at step {step} without a checkpoint of it; the last "
                       f"checkpoint is {last_checkpoint}; {_continue(run_dir)}")


def plots_stopped(code: int, run_dir: Path) -> Preempted:
    """The error of a stop while a finished run's plots were drawn: nothing is lost, the plots wait."""
    rest = (f"while writing the plots; the run is finished and its checkpoints are kept in {run_dir / 'checkpoints'}; "
            "the same command with --resume auto writes the plots")
    if code == StopCode.INT:
        return Interrupted(f"interrupted (Ctrl-C) {rest}")
    if code == StopCode.REQUEUE:
        return RequeueRequested(f"stopped by {requeue_signal().name} (the scheduler's warning) {rest}")
    return Preempted(f"stopped by SIGTERM {rest}")
