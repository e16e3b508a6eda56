"""The run directory: what a run may do with it, decided once on rank 0 and held for the run's life.

A run directory holds config.yaml, metrics.jsonl, metrics.csv, checkpoints/ and plots/. Opening
it decides between a fresh run, a resumption (``--resume auto`` or a checkpoint inside it) and a
fork (``--resume PATH`` of another run into a new directory), and refuses, in one line, whatever
would lose a run: replacing one without ``--overwrite``, resuming another config, starting over
where checkpoints exist but none can be used, or writing where another process writes.

Opening looks first (``Seen``), then one pure function, ``decide``, chooses (``Decision``), and a
small executor acts: the contract in docs/reliability.md is that function's table.

While a run is open, rank 0 holds an exclusive ``flock`` on ``.lock`` in the directory. The
operating system releases it when the process ends, however it ends, so a crash never leaves a
stale lock. A run refused before its first step takes away exactly what it created, and puts
back the run that ``--overwrite`` was replacing (kept aside in ``.replaced/`` until then); a run
killed before its first step leaves ``.replaced/``, and the next opening puts it back, saying so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from largebatch import checkpoint as ckpt
from largebatch.config import (
    RESUMABLE_CHANGES,
    ConfigError,
    TrainConfig,
    config_differences,
    dump_yaml,
    flatten_keys,
    from_dict,
    read_yaml_mapping,
    to_dict,
)
from largebatch.distributed import broadcast_object
from largebatch.errors import UserError
from largebatch.metrics import read_jsonl
from largebatch.plots import STAGING as PLOTS_STAGING

LOCK_FILE = ".lock"
REPLACED = ".replaced"  # the run an --overwrite replaces, kept until the new run's first step
DELETING = ".replaced.deleting"  # REPLACED once the new run made its first step, while it is deleted
# resumable changes not worth a notice: where the run lives and how it reports
QUIET_CHANGES = frozenset({"out", "progress"})
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

    def where(self) -> Path | None:
        """The lock file's path now, through the open descriptor (it follows a moved directory)."""
        if self._fd is None:
            return None
        try:
            return Path(os.readlink(f"/proc/self/fd/{self._fd}").removesuffix(" (deleted)"))
        except OSError:
            return None

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


def checkpoint_config_differences(payload: dict, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(keys that forbid resuming, resumable changes as ``key old -> new``) between the config
    a checkpoint was written with and ``config``; an older checkpoint without one differs in nothing."""
    stored = payload.get("config")
    if not isinstance(stored, dict):
        return [], []
    with contextlib.suppress(ConfigError, TypeError, ValueError):
        stored = to_dict(from_dict(stored))
    new = to_dict(config)
    a, b = flatten_keys(stored), flatten_keys(new)
    changes = [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(RESUMABLE_CHANGES - QUIET_CHANGES)
               if a.get(k) != b.get(k)]
    return config_differences(stored, new), changes


def _non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


# ---- the decision: what opening a run directory does, from what it found (pure, tested from a table) ----


@dataclass(frozen=True)
class Seen:
    """What rank 0 found in the run directory before changing anything: the decision's only input."""

    directory: Path
    holds_run: bool = False  # config.yaml, a checkpoint file, or metrics rows
    config_diffs: tuple[str, ...] | None = None  # keys config.yaml differs in; None: no config.yaml
    store_problem: str | None = None  # checkpoints/ is a dangling symlink or not a directory
    newest: Path | None = None  # newest step checkpoint that verifies and loads
    newest_diffs: tuple[str, ...] = ()  # keys its own stored config differs in
    unusable: int = 0  # checkpoint files there when none is usable
    best: Path | None = None  # best.pt, when it verifies and loads
    target: Path | None = None  # --resume PATH (verified and loaded)
    target_inside: bool = False  # PATH lies in this run directory
    target_diffs: tuple[str, ...] = ()  # keys PATH's stored config differs in
    source_diffs: tuple[str, ...] | None = None  # keys PATH's run's config.yaml differs in
    changes: tuple[str, ...] = ()  # resumable changes of the checkpoint to continue (notices)


@dataclass(frozen=True)
class Decision:
    """``fresh`` (step 0), ``resume`` (this run, from ``checkpoint``), ``fork`` (another run's
    ``checkpoint`` continued here) or ``refuse`` (``message``, nothing changed). ``clear``: the
    run there is moved aside first (deleted at the new run's first step)."""

    action: str
    checkpoint: Path | None = None
    clear: bool = False
    message: str = ""
    notices: tuple[str, ...] = ()


def _refuse(message: str) -> Decision:
    return Decision("refuse", message=message)


def decide(resume: str | None, overwrite: bool, seen: Seen) -> Decision:
    """What ``train`` with ``--resume`` / ``--overwrite`` does in a directory in the state ``seen``."""
    d = seen.directory
    if seen.store_problem is not None:
        return _refuse(seen.store_problem)
    if resume not in (None, "auto"):
        return _decide_path(Path(resume), overwrite, seen)
    if resume is None:
        if seen.holds_run and not overwrite:
            return _refuse(f"run directory {d} already holds a run; pass --resume auto to continue it "
                           "or --overwrite to replace it")
        return Decision("fresh", clear=seen.holds_run)
    differs = bool(seen.config_diffs)
    if differs and not overwrite:
        return _refuse(f"cannot resume {d}: the config differs in {', '.join(seen.config_diffs or ())}; "
                       "use a new --out or --overwrite")
    if seen.newest is not None and not differs:
        if not seen.newest_diffs:
            return Decision("resume", checkpoint=seen.newest, notices=_changed(seen))
        if not overwrite:
            return _refuse(f"cannot resume {d}: its checkpoint {seen.newest.name} was written with a config that "
                           f"differs in {', '.join(seen.newest_diffs)}; use a new --out or --overwrite")
    elif seen.unusable and not overwrite:
        if seen.best is not None:
            return _refuse(f"run directory {d} holds a run but none of its step checkpoints can be used; "
                           f"{seen.best.name} can: continue from it with --resume {seen.best} (or fork it into a "
                           "new --out), or pass --overwrite to start again from step 0")
        return _refuse(f"run directory {d} holds a run but none of its {seen.unusable} checkpoint(s) can be used; "
                       "pass --overwrite to start it again from step 0")
    return Decision("fresh", clear=seen.holds_run)


def _changed(seen: Seen) -> tuple[str, ...]:
    return (f"resuming with changed settings: {'; '.join(seen.changes)}",) if seen.changes else ()


def _decide_path(path: Path, overwrite: bool, seen: Seen) -> Decision:
    d = seen.directory
    if seen.target is None:
        return _refuse(f"--resume {path}: no such checkpoint")
    if seen.target_inside:
        if seen.config_diffs:
            return _refuse(f"cannot resume {d}: the config differs in {', '.join(seen.config_diffs)}; "
                           "use a new --out or --overwrite")
    elif seen.source_diffs:
        return _refuse(_fork_differs(path, d, seen.source_diffs))
    if seen.target_diffs:
        return _refuse(f"cannot resume {path}: it was written with a config that differs in "
                       f"{', '.join(seen.target_diffs)}; give the config it was written with")
    if seen.target_inside:
        return Decision("resume", checkpoint=path, notices=_changed(seen))
    if seen.holds_run and not overwrite:
        return _refuse(f"run directory {d} already holds a run; choose a new --out to continue {path} there, "
                       "or pass --overwrite to replace it")
    return Decision("fork", checkpoint=path, clear=seen.holds_run,
                    notices=(f"forking the run: continuing {path} in {d}", *_changed(seen)))


def _fork_differs(path: Path, d: Path, keys: tuple[str, ...]) -> str:
    """A fork asked with settings its source was not trained with: what can be done instead."""
    why = ("; its learning-rate schedule ends with its last epoch, so a finished run cannot be extended"
           if "epochs" in keys else "")
    return (f"cannot continue {path} in {d}: the config differs in {', '.join(keys)}, and a run continues only "
            f"with the config it was trained with{why}; to fork it, give the same command without the changed "
            "settings; to train with them, give it without --resume (a new run)")


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
        self._identity: tuple[int, int] | None = None  # (device, inode) of the directory opened
        self._checkpoints_at_open: dict[str, tuple[int, int]] = {}  # name -> (inode, mtime) once opened

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
        except RunDirError:  # in use: even a directory this process just made belongs to the holder now
            raise
        except OSError as err:
            self._remove_created()
            raise RunDirError(f"cannot write the run directory {self.path}: {err.strerror or err}") from None
        except BaseException:
            self._remove_created()
            raise
        try:
            info = os.stat(self.path)
            self._identity = (info.st_dev, info.st_ino)
            resume = self._resume_target(resume)
            seen = self._observe(resume, overwrite)
            path = self._carry_out(decide(resume, overwrite, seen))
            self._checkpoints_at_open = self._checkpoint_identities()
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

    def _resume_target(self, resume: str | None) -> str | None:
        """``--resume DIR``, a run directory (or its checkpoints/): this one's is ``auto``, another's its
        newest checkpoint that verifies and loads (a fork); a checkpoint file or ``auto`` as given."""
        if resume in (None, "auto") or not Path(resume).is_dir():
            return resume
        source = Path(resume)
        store = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        if store.resolve() == self.checkpoints.resolve():
            return "auto"
        found = ckpt.newest_loadable(store, warn=self.notice)
        if found is None:
            count = len(ckpt.step_checkpoints(store))
            what = f"none of its {count} checkpoint(s) can be used" if count else "a directory without checkpoints"
            raise RunDirError(f"--resume {source}: {what}; give a run directory (its newest valid checkpoint), "
                              "a checkpoint file, or auto")
        return str(found[0])

    def _store_problem(self) -> str | None:
        """A checkpoint store that is not there (a scratch disk not mounted) stops the run untouched."""
        store = self.checkpoints
        if store.is_symlink() and not store.exists():
            return (f"checkpoint store {store} is a symlink to {os.readlink(store)}, which does not exist "
                    "(is its disk mounted?); nothing was changed")
        if store.exists() and not store.is_dir():
            return f"checkpoint store {store} is not a directory; move it away; nothing was changed"
        return None

    def _observe(self, resume: str | None, overwrite: bool) -> Seen:
        """Look (after putting back an interrupted replacement and removing half-written files)."""
        problem = self._store_problem()
        if problem is not None:
            return Seen(self.path, store_problem=problem)
        self._put_back_replaced()
        self._clean_partial_writes()
        diffs = config_differences_from(self.config_file, self.config) if self.config_file.exists() else None
        seen = Seen(self.path, holds_run=self.holds_run(), config_diffs=None if diffs is None else tuple(diffs))
        if resume not in (None, "auto"):
            return self._observe_target(Path(resume), seen)
        if resume is None or (diffs and not overwrite):
            return seen
        found = ckpt.newest_loadable(self.checkpoints, warn=self.notice)
        if found is None:
            return replace(seen, unusable=len(self._checkpoint_files()), best=self._usable_best())
        refused, changes = checkpoint_config_differences(found[1], self.config)
        return replace(seen, newest=found[0], newest_diffs=tuple(refused), changes=tuple(changes))

    def _observe_target(self, path: Path, seen: Seen) -> Seen:
        if not path.is_file():
            return seen
        payload = ckpt.load_checkpoint(path)  # a damaged or unsafe PATH is refused here, in one line
        refused, changes = checkpoint_config_differences(payload, self.config)
        seen = replace(seen, target=path, target_inside=_inside(path, self.path), target_diffs=tuple(refused),
                       changes=tuple(changes))
        source = path.parent.parent if path.parent.name == "checkpoints" else None
        if not seen.target_inside and source is not None and (source / CONFIG_FILE).exists():
            seen = replace(seen, source_diffs=tuple(config_differences_from(source / CONFIG_FILE, self.config)))
        return seen

    def _usable_best(self) -> Path | None:
        best = self.checkpoints / "best.pt"
        try:
            ckpt.load_checkpoint(best)
        except ckpt.CheckpointError:
            return None
        return best

    def _carry_out(self, decision: Decision) -> Path | None:
        """The executor: do what ``decide`` chose."""
        if decision.action == "refuse":
            raise RunDirError(decision.message)
        if decision.action in ("fresh", "fork"):
            self._create(clear=decision.clear)
        if decision.action == "fork":
            assert decision.checkpoint is not None
            self._copy_records(decision.checkpoint)
        for line in decision.notices:
            self.notice(line)
        return self._records_readable(decision.checkpoint) if decision.checkpoint is not None else None

    def _copy_records(self, checkpoint: Path) -> None:
        """A fork starts with its source's records (the rows after its step are dropped on resume)."""
        source = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
        for name in ("metrics.jsonl", "metrics.csv"):
            if source is not None and (source / name).is_file():
                shutil.copyfile(source / name, self.path / name)

    def _put_back_replaced(self) -> None:
        """A run moved aside by an ``--overwrite`` that never reached its first step (killed) is put
        back, with a notice: it is never deleted behind the user's back."""
        deleting = self.path / DELETING
        if deleting.is_dir() and not deleting.is_symlink():  # a deletion already committed, interrupted
            shutil.rmtree(deleting)
        replaced = self.path / REPLACED
        if not replaced.is_dir() or replaced.is_symlink():
            return
        aside = {entry.name for entry in replaced.iterdir()}
        if ("checkpoints" in aside and self._checkpoint_files()) or (
                "metrics.jsonl" in aside and _non_empty(self.path / "metrics.jsonl")):
            # both hold progress: the replacing run got further than its first step (an older
            # version's interrupted deletion, or hands): not ours to choose
            raise RunDirError(
                f"run directory {self.path} holds a run, and in {replaced} the run an interrupted --overwrite moved "
                f"aside; keep one: move the files of {replaced} back into {self.path}, or delete {replaced}"
            )
        for name in aside & set(RUN_FILES):  # the replacing run's, made before it was stopped; what is not
            current = self.path / name       # aside yet is the old run's, never moved (killed mid-move)
            if current.is_dir() and not current.is_symlink():
                shutil.rmtree(current)
            elif current.exists() or current.is_symlink():
                current.unlink()
        for entry in replaced.iterdir():
            os.replace(entry, self.path / entry.name)
        replaced.rmdir()
        self._before = {p.name for p in self.path.iterdir()} if self._created_root is None else set()
        self.notice(f"put back the run that an interrupted --overwrite had moved aside into {replaced} "
                    "(the replacing run never made its first step)")

    def _clean_partial_writes(self) -> None:
        """Half-written files from a crash mid-write; safe to remove now that we hold the lock."""
        removed = ckpt.remove_partial_writes(self.checkpoints)
        tmp_config = self.path / (CONFIG_FILE + ".tmp")
        if tmp_config.exists():
            tmp_config.unlink()
            removed.append(tmp_config)
        staging = self.path / PLOTS_STAGING  # plots being drawn when the process was killed
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging)
            removed.append(staging)
        if removed:
            self.notice(f"removed {len(removed)} half-written file(s) left by an interrupted write: "
                        f"{', '.join(p.name for p in removed)}")

    def _checkpoint_files(self) -> list[Path]:
        best = self.checkpoints / "best.pt"
        return ckpt.step_checkpoints(self.checkpoints) + ([best] if best.exists() else [])

    def holds_run(self) -> bool:
        """config.yaml, a checkpoint, or metrics rows (perhaps another run's, through a symlink)."""
        records = [self.path / n for n in ("metrics.jsonl", "metrics.csv")]
        return (self.config_file.exists() or bool(self._checkpoint_files())
                or any(_non_empty(p) for p in records))

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
            replaced.mkdir()  # never there now: an earlier one was put back when the directory was opened
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

    # ---- while the run runs --------------------------------------------------------------------

    def moved_to(self) -> Path | None:
        """Where the run directory is now, if it was moved (or replaced) since it was opened; else None.

        Rank 0 holds the directory's lock file open, so the moved directory is found through it.
        """
        if self._identity is None:
            return None
        try:
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._identity:
                return None
        except OSError:
            pass
        lock = self._lock.where()
        return lock.parent if lock is not None else None

    def _checkpoint_identities(self) -> dict[str, tuple[int, int]]:
        found = {}
        for path in self._checkpoint_files():
            with contextlib.suppress(OSError):
                info = path.stat()
                found[path.name] = (info.st_ino, info.st_mtime_ns)
        return found

    def wrote_checkpoint(self) -> bool:
        """Whether this run wrote a checkpoint (a step's or best.pt) since it opened the directory
        (rank 0; each write is a new file renamed into place). A run that fails on a user error
        before its first one has nothing to continue from, and takes away what it created."""
        return self.is_main and self._checkpoint_identities().items() - self._checkpoints_at_open.items() != set()

    # ---- closing -------------------------------------------------------------------------------

    def commit(self) -> None:
        """The new run has made its first step: the run it replaced is deleted for good (renamed
        first, so that a kill mid-deletion never leaves half a run that looks like one put aside)."""
        if self._replacing:
            os.replace(self.path / REPLACED, self.path / DELETING)
            shutil.rmtree(self.path / DELETING, ignore_errors=True)
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


def finished_notice(run_dir: Path, steps: int) -> str:
    """What ``--resume auto`` on a finished run says: its result, where it is, how to train longer."""
    top1 = None
    with contextlib.suppress(OSError, ValueError):
        evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
        top1 = evals[-1].get("top1") if evals else None
    figure = f", top-1 {top1:.2f}% at its last evaluation" if isinstance(top1, (int, float)) else ""
    best = run_dir / "checkpoints" / "best.pt"
    results = [run_dir / "metrics.csv", run_dir / "plots", *([best] if best.exists() else [])]
    return (f"run {run_dir} is already finished (step {steps} of {steps}{figure}); results: "
            f"{', '.join(map(str, results))}; to train longer, start a new run with more --epochs in a new --out "
            "(a finished run cannot be extended)")


__all__ = ["CONFIG_FILE", "LOCK_FILE", "REPLACED", "Decision", "DirectoryLock", "RunDir", "RunDirError", "Seen",
           "checkpoint_config_differences", "config_differences_from", "decide", "finished_notice"]
