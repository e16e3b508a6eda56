"""The run directory: what a run may do with it, decided once on rank 0 and held for the run's life.

A run directory holds config.yaml, metrics.jsonl, metrics.csv, checkpoints/ and plots/. Opening
it decides between a fresh run, a resumption (``--resume auto`` or a checkpoint inside it) and a
fork (``--resume PATH`` of another run into a new directory), and refuses, in one line, whatever
would lose a run: replacing one without ``--overwrite``, resuming another config, starting over
where checkpoints exist but none can be used, or writing where another process writes.

While a run is open, rank 0 holds an exclusive ``flock`` on ``.lock`` in the directory. The
operating system releases it when the process ends, however it ends, so a crash never leaves a
stale lock. A run refused before its first step takes away exactly what it created, and puts
back the run that ``--overwrite`` was replacing (kept aside in ``.replaced/`` until then).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from largebatch import checkpoint as ckpt
from largebatch.config import (
    ConfigError,
    TrainConfig,
    config_differences,
    dump_yaml,
    from_dict,
    read_yaml_mapping,
    to_dict,
)
from largebatch.distributed import broadcast_object
from largebatch.errors import UserError
from largebatch.metrics import read_jsonl

LOCK_FILE = ".lock"
REPLACED = ".replaced"  # the run an --overwrite replaces, kept until the new run's first step
CONFIG_FILE = "config.yaml"
# what a run writes into its directory, removed when --overwrite replaces it
RUN_FILES = ("metrics.jsonl", "metrics.csv", "checkpoints", "plots", "tensorboard", CONFIG_FILE)


class RunDirError(UserError, ValueError):
    """The run directory cannot be used as asked; nothing in it was changed."""


class DirectoryLock:
    """An exclusive ``flock`` on a file, naming its holder (pid and host) inside the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise RunDirError(
                f"run directory {self.path.parent} is in use by {who}; "
                "wait for that run to end (or stop it), or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:  # a Trainer dropped without run(): do not hold the directory until exit
        self.release()


def config_differences_from(config_file: Path, config: TrainConfig) -> list[str]:
    """The keys in which ``config`` differs from a stored run config (ignoring resumable ones)."""
    tree = read_yaml_mapping(config_file, "run config")
    try:
        old = to_dict(from_dict(tree))
    except ConfigError as err:
        raise RunDirError(f"run config {config_file} is not a valid config: {err}") from None
    return config_differences(old, to_dict(config))


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


class RunDir:
    """One run's directory. ``open`` on every rank (rank 0 decides), ``close`` when the run ends."""

    def __init__(self, path: str | Path, config: TrainConfig, *, is_main: bool,
                 notice: Callable[[str], None] = print) -> None:
        self.path = Path(path)
        self.config = config
        self.is_main = is_main
        self.notice = notice
        self.config_file = self.path / CONFIG_FILE
        self.checkpoints = self.path / "checkpoints"
        self._lock = DirectoryLock(self.path / LOCK_FILE)
        self._created_root: Path | None = None  # the topmost directory this run created
        self._before: set[str] = set()  # entries that were there before this run
        self._replacing = False  # the old run is in REPLACED until the first step

    # ---- opening -------------------------------------------------------------------------------

    def open(self, resume: str | None, overwrite: bool) -> Path | None:
        """Lock and prepare the directory; the checkpoint to resume from, or None for step 0.

        Every rank calls this; rank 0 decides and tells the others, so all raise the same error.
        """
        decision: dict[str, object] = {}
        if self.is_main:
            try:
                decision["path"] = self._open_main(resume, overwrite)
            except UserError as err:  # RunDirError, RunRecordError, ConfigError, CheckpointError
                decision["error"] = (isinstance(err, ckpt.CheckpointError), str(err))
        decision = broadcast_object(decision)  # type: ignore[assignment]
        if "error" in decision:
            is_checkpoint, message = decision["error"]  # type: ignore[misc]
            raise (ckpt.CheckpointError if is_checkpoint else RunDirError)(message)
        path = decision.get("path")
        return Path(str(path)) if path else None

    def _open_main(self, resume: str | None, overwrite: bool) -> str | None:
        try:
            self._make_dir()
            self._lock.acquire()
        except OSError as err:
            self._remove_created()
            raise RunDirError(f"cannot write the run directory {self.path}: {err.strerror or err}") from None
        except RunDirError:
            self._remove_created()
            raise
        try:
            self._clean_partial_writes()
            path = self._decide(resume, overwrite)
        except OSError as err:
            self.close(discard=True)
            raise RunDirError(f"cannot write the run directory {self.path}: {err.strerror or err}") from None
        except BaseException:
            self.close(discard=True)
            raise
        return str(path) if path else None

    def _make_dir(self) -> None:
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self._created_root = missing[-1] if missing else None
        self.path.mkdir(parents=True, exist_ok=True)
        self._before = set() if missing else {p.name for p in self.path.iterdir()}

    def _clean_partial_writes(self) -> None:
        """Half-written files from a crash mid-write; safe to remove now that we hold the lock."""
        removed = ckpt.remove_partial_writes(self.checkpoints)
        tmp_config = self.path / (CONFIG_FILE + ".tmp")
        if tmp_config.exists():
            tmp_config.unlink()
            removed.append(tmp_config)
        if removed:
            self.notice(f"removed {len(removed)} half-written file(s) left by an interrupted write: "
                        f"{', '.join(p.name for p in removed)}")

    def _checkpoint_files(self) -> list[Path]:
        best = self.checkpoints / "best.pt"
        return ckpt.step_checkpoints(self.checkpoints) + ([best] if best.exists() else [])

    def holds_run(self) -> bool:
        return self.config_file.exists() or bool(self._checkpoint_files())

    def _check_same_run(self, config_file: Path, what: str) -> None:
        if not config_file.exists():
            return
        diffs = config_differences_from(config_file, self.config)
        if diffs:
            raise RunDirError(
                f"cannot resume {what}: the config differs in {', '.join(diffs)}; use a new --out or --overwrite"
            )

    def _decide(self, resume: str | None, overwrite: bool) -> Path | None:
        held = self.holds_run()
        if resume not in (None, "auto"):
            return self._resume_from(Path(resume), held, overwrite)
        if resume == "auto":
            if not overwrite:
                self._check_same_run(self.config_file, str(self.path))
            newest = ckpt.newest_valid(self.checkpoints, warn=self.notice, loadable=True)
            if newest is not None and not (overwrite and self._differs()):
                return self._records_readable(newest)
            unusable = self._checkpoint_files()
            if unusable and not overwrite:
                raise RunDirError(
                    f"run directory {self.path} holds a run but none of its {len(unusable)} checkpoint(s) "
                    "can be used; pass --overwrite to start it again from step 0"
                )
        elif held and not overwrite:
            raise RunDirError(
                f"run directory {self.path} already holds a run; pass --resume auto to continue it "
                "or --overwrite to replace it"
            )
        self._create(clear=held)
        return None

    def _differs(self) -> bool:
        return self.config_file.exists() and bool(config_differences_from(self.config_file, self.config))

    def _resume_from(self, path: Path, held: bool, overwrite: bool) -> Path:
        if not path.is_file():
            raise RunDirError(f"--resume {path}: no such checkpoint")
        ckpt.verify_checkpoint(path)
        if _inside(path, self.path):
            self._check_same_run(self.config_file, str(self.path))
            return self._records_readable(path)
        # a fork: the run continues from PATH in this (new) directory, PATH's run is left as it is
        source = path.parent.parent if path.parent.name == "checkpoints" else None
        if source is not None:
            self._check_same_run(source / CONFIG_FILE, f"{path} into {self.path}")
        if held and not overwrite:
            raise RunDirError(
                f"run directory {self.path} already holds a run; choose a new --out to continue {path} there, "
                "or pass --overwrite to replace it"
            )
        self._create(clear=held)
        if source is not None and (source / "metrics.jsonl").is_file():
            shutil.copyfile(source / "metrics.jsonl", self.path / "metrics.jsonl")  # rows after PATH are dropped
        self.notice(f"forking the run: continuing {path} in {self.path}")
        return self._records_readable(path)

    def _records_readable(self, resume_from: Path) -> Path:
        """A resumed run appends to metrics.jsonl: a bad row in it stops every rank here, not rank 0 later."""
        if (self.path / "metrics.jsonl").exists():
            read_jsonl(self.path / "metrics.jsonl")  # a torn last line is dropped (with a notice) on truncation
        return resume_from

    def _create(self, clear: bool) -> None:
        """A fresh run: config.yaml and checkpoints/; the old run's files (only with --overwrite)
        are moved aside, deleted once the new run has made its first step (``commit``)."""
        if clear:
            replaced = self.path / REPLACED
            if replaced.exists():
                shutil.rmtree(replaced)  # left by an earlier replacement that never reached its first step
            replaced.mkdir()
            self._before.discard(REPLACED)
            self._replacing = True
            for name in RUN_FILES:
                if (self.path / name).exists() or (self.path / name).is_symlink():
                    os.replace(self.path / name, replaced / name)
                self._before.discard(name)  # gone now: what appears under this name is ours
        self.checkpoints.mkdir(exist_ok=True)
        tmp = self.path / (CONFIG_FILE + ".tmp")
        tmp.write_text(dump_yaml(self.config))
        os.replace(tmp, self.config_file)

    # ---- closing -------------------------------------------------------------------------------

    def commit(self) -> None:
        """The new run has made its first step: the run it replaced is deleted for good."""
        if self._replacing:
            shutil.rmtree(self.path / REPLACED, ignore_errors=True)
            self._replacing = False

    def close(self, discard: bool = False) -> None:
        """Release the lock; with ``discard`` (a refused run) first remove what this run created."""
        if not self.is_main:
            return
        if discard:
            self._remove_created()  # still under the lock: no other run sees it half removed
        self._lock.release()

    def _remove_created(self) -> None:
        with contextlib.suppress(OSError):
            if self._created_root is not None:
                shutil.rmtree(self.path)
                for parent in self.path.parents:  # the parents it made, unless another run is in them now
                    if not parent.is_relative_to(self._created_root):
                        break
                    parent.rmdir()
                return
            for entry in self.path.iterdir():
                if entry.name not in self._before and entry.name != REPLACED:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            replaced = self.path / REPLACED
            if self._replacing:  # put back the run that --overwrite was replacing
                for entry in replaced.iterdir():
                    os.replace(entry, self.path / entry.name)
                replaced.rmdir()
                self._replacing = False


__all__ = ["CONFIG_FILE", "LOCK_FILE", "REPLACED", "DirectoryLock", "RunDir", "RunDirError", "config_differences_from"]
