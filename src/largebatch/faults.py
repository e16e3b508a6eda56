"""Fault injection for the reliability tests: kill this process at a chosen point, once.

Set ``LARGEBATCH_FAULT`` to ``POINT:STEP[:RANK[:MARKER]]``: at POINT (``step``: after the update
of global step STEP; ``checkpoint``: while the checkpoint of STEP is half written, its data on
disk but not yet renamed into place), on RANK (default 0), the process sends itself SIGKILL.
With MARKER, a file path, the fault fires only if the file does not exist and creates it first,
so a restarted run goes past the same point. Unset, this costs one dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "LARGEBATCH_FAULT"
POINTS = ("step", "checkpoint")


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
