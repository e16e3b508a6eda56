"""Fault injection for the reliability tests: kill this process at a chosen point, once.

Set ``LARGEBATCH_FAULT`` to ``POINT:STEP[:RANK[:MARKER]]``: at POINT (``step``: after the update
of global step STEP; ``checkpoint``: while the checkpoint of STEP is half written, its data on
disk but not yet renamed into place), on RANK (default 0), the process sends itself SIGKILL.
With MARKER, a file path, the fault fires only if the file does not exist and creates it first,
so a restarted run goes past the same point. Unset, this costs one dictionary lookup per call.

``LARGEBATCH_PAUSE`` (``POINT:STEP:RANK:MARKER``, several separated by commas; POINT also ``eval``,
at the first evaluation batch after STEP, and ``plots``, as the final plots of a run ending at STEP
are drawn) makes the process write its pid to MARKER and wait
there for a stop signal (SIGTERM, SIGINT, SIGUSR1, SIGUSR2), which it then delivers to itself:
a test can signal a run at an exact point, without depending on timing. With MARKER present it
does not wait (the restarted run goes on).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "LARGEBATCH_FAULT"
PAUSE_ENV = "LARGEBATCH_PAUSE"
POINTS = ("step", "checkpoint")
PAUSE_POINTS = ("step", "checkpoint", "eval", "plots")
PAUSE_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}
PAUSE_LIMIT_S = 300.0


def maybe_kill(point: str, step: int, rank: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    parts = spec.split(":", 3)
    if len(parts) < 2 or parts[0] not in POINTS:
        raise ValueError(f"{ENV} must be POINT:STEP[:RANK[:MARKER]], POINT one of {', '.join(POINTS)}; got {spec!r}")
    want_point, want_step = parts[0], int(parts[1])
    want_rank = int(parts[2]) if len(parts) > 2 and parts[2] else 0
    marker = Path(parts[3]) if len(parts) > 3 else None
    if (point, step, rank) != (want_point, want_step, want_rank):
        return
    if marker is not None:
        if marker.exists():
            return
        marker.write_text(f"{point} at step {step} on rank {rank}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_pause(point: str, step: int, rank: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    for entry in spec.split(","):
        parts = entry.split(":", 3)
        if len(parts) != 4 or parts[0] not in PAUSE_POINTS:
            raise ValueError(f"{PAUSE_ENV} entries must be POINT:STEP:RANK:MARKER, POINT one of "
                             f"{', '.join(PAUSE_POINTS)}; got {entry!r}")
        marker = Path(parts[3])
        if (point, step, rank) == (parts[0], int(parts[1]), int(parts[2])) and not marker.exists():
            _pause_for_signal(marker)


def _pause_for_signal(marker: Path) -> None:
    """Announce (marker) and wait for a stop signal, then let its handler run: no signal can slip in between."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PAUSE_SIGNALS)
    try:
        marker.write_text(f"{os.getpid()}\n")
        got = signal.sigtimedwait(PAUSE_SIGNALS, PAUSE_LIMIT_S)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    if got is None:
        raise RuntimeError(f"{PAUSE_ENV}: no signal came within {PAUSE_LIMIT_S:.0f} s")
    signal.raise_signal(got.si_signo)
