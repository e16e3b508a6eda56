"""The checkpoint file format: atomic writes, an integrity check, loading that runs no code.

When the trainer writes which state, and reads it back, is :mod:`largebatch.checkpointer`.

Each checkpoint is ``step_NNNNNNNN.pt`` with a ``.sha256`` beside it. Both are written to
temporary files, fsynced and renamed, the digest last, so a checkpoint counts only once it is
complete. Nothing is overwritten in place: older checkpoints are pruned only after a newer one
is complete. Loading uses ``torch.load(weights_only=True)``, which refuses pickled code.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from largebatch.errors import UserError, first_line

STEP_FILE = re.compile(r"^step_(\d{8,})\.pt$")
FORMAT = 1  # the payload layout this version writes; a newer one is refused, never half-read


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or trusted; the message names the path."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, before_commit: Callable[[], None] | None = None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(
    path: str | Path, payload: dict[str, Any], before_commit: Callable[[], None] | None = None
) -> Path:
    """Write ``payload`` to ``path`` atomically with its SHA-256 beside it.

    ``before_commit`` runs once the data is on disk under a temporary name, before the rename
    (the fault-injection tests kill the process there).
    """
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data, before_commit)
        _atomic_write(path.with_suffix(path.suffix + ".sha256"), f"{digest}  {path.name}\n".encode())
    except OSError as err:
        reason = err.strerror or str(err)
        earlier = [p for p in path.parent.glob("*.pt") if p != path] if path.parent.is_dir() else []
        kept = "earlier checkpoints are kept" if earlier else "no earlier checkpoint exists"
        raise CheckpointError(
            f"cannot write checkpoint {path}: {reason}; {kept}"
        ) from None
    return path


def _is_regular(path: Path) -> bool:
    """A regular file (after symlinks): never open a FIFO (it blocks) or a device as a checkpoint."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def verify_checkpoint(path: str | Path) -> None:
    """Raise CheckpointError unless the file exists and matches its recorded SHA-256."""
    path = Path(path)
    sidecar = path.with_suffix(path.suffix + ".sha256")
    if path.exists() and not _is_regular(path):
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    if sidecar.exists() and not _is_regular(sidecar):
        raise CheckpointError(f"checkpoint {path}: its integrity record {sidecar.name} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err.strerror}") from None
    try:
        expected = sidecar.read_text().split()[0]
    except (OSError, IndexError):
        raise CheckpointError(
            f"checkpoint {path} has no integrity record ({sidecar.name}); it may be incomplete. A checkpoint "
            f"copied on its own needs its {sidecar.name} beside it (copy both files)"
        ) from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated (SHA-256 does not match {sidecar.name})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Verify, then load with ``weights_only=True``: tensors and plain data only, never code."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError or RuntimeError, by torch version
        first = first_line(err, 160)
        if isinstance(err, pickle.UnpicklingError):  # the weights-only unpickler met something it refuses
            raise CheckpointError(
                f"checkpoint {path} was refused: it holds more than weights and plain data ({first[:160]})"
            ) from None
        raise CheckpointError(  # not a readable archive: damaged after its digest was taken (or digest recomputed)
            f"checkpoint {path} is damaged: it matches its {path.name}.sha256 but cannot be read ({first[:160]})"
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a largebatch checkpoint")
    version = payload.get("format", FORMAT)
    if not isinstance(version, int) or version > FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is of format {version}, newer than this version of largebatch reads "
            f"(up to {FORMAT}); resume it with the version that wrote it"
        )
    return payload


def step_checkpoints(directory: str | Path) -> list[Path]:
    """``step_*.pt`` files in the directory, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name)) and _is_regular(p)]
    return [p for _, p in sorted(found)]


def step_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"step_{step:08d}.pt"


def newest_valid(directory: str | Path, warn: Any = None, loadable: bool = False) -> Path | None:
    """The newest checkpoint that passes its integrity check; bad ones are reported and skipped.

    With ``loadable`` a checkpoint must also load as weights and plain data: one refused as
    unsafe (pickled code) is skipped like a corrupt one. Its payload never runs either way,
    because loading is ``weights_only``.
    """
    if loadable:
        found = newest_loadable(directory, warn)
        return found[0] if found else None
    for path in reversed(step_checkpoints(directory)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            if warn is not None:
                warn(f"{err}; trying the previous one")
    return None


def newest_loadable(directory: str | Path, warn: Any = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest step checkpoint that verifies and loads, with its payload (read once)."""
    for path in reversed(step_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            if warn is not None:
                warn(f"{err}; trying the previous one")
    return None


def step_of_name(path: Path) -> int | None:
    """The step a ``step_NNNNNNNN.pt`` name claims (None for other names, e.g. best.pt)."""
    m = STEP_FILE.match(path.name)
    return int(m.group(1)) if m else None


def is_partial_write(path: Path) -> bool:
    """A temporary file of ``_atomic_write`` (``.NAME.XXXX.tmp``), left behind if the writer died."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def remove_partial_writes(directory: str | Path) -> list[Path]:
    """Delete the half-written files a crash left in ``directory``; only safe while no writer runs."""
    directory = Path(directory)
    removed = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if is_partial_write(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
    return removed


def prune(directory: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (with their digests)."""
    for path in step_checkpoints(directory)[:-keep] if keep > 0 else []:
        for victim in (path, path.with_suffix(path.suffix + ".sha256")):
            with contextlib.suppress(FileNotFoundError):
                victim.unlink()
