"""The exceptions that end a run without a traceback, and the exit status of each.

Kept free of torch (and of every other largebatch module) so that every floor can raise these
and the command line can map them to exit statuses without importing the trainer.
"""

from __future__ import annotations

__all__ = [
    "EXIT_LOST_PEER", "EXIT_REQUEUE", "EXIT_STATUS", "DivergenceError", "Interrupted", "Preempted",
    "RequeueRequested", "UserError", "exit_status", "first_line", "is_lost_peer", "is_out_of_memory", "on_every_rank",
    "one_line", "printed_on_rank",
]

EXIT_LOST_PEER = 4


class UserError(Exception):
    """A mistake the user can fix (config, data, checkpoint, plan, model options).

    The message is one line naming the offending value and what is allowed; the command line
    prints it as ``largebatch: error: ...`` and exits 2. Subclasses keep their historical second
    base (ValueError, RuntimeError) so existing ``except`` clauses still catch them.
    """


class DivergenceError(RuntimeError):
    """The loss or a gradient became non-finite; the last good checkpoint is untouched."""


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was written at the step boundary."""


class Interrupted(Preempted):
    """Ctrl-C (SIGINT): a checkpoint at the step boundary, or none after a second Ctrl-C."""


class RequeueRequested(Preempted):
    """The scheduler's warning signal (SIGUSR1 by default): checkpoint written, the job script requeues."""


# EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry"; the sbatch
# examples requeue the job on this status and on no other
EXIT_REQUEUE = 75

# the one table the command line consults, most specific first
EXIT_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (UserError, 2),
    (DivergenceError, 3),
    (Interrupted, 130),
    (RequeueRequested, EXIT_REQUEUE),
    (Preempted, 143),
)

# how a collective reports a peer process or host that went away (or timed out)
_LOST_PEER_MARKS = ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "timed out")


def is_lost_peer(err: BaseException) -> bool:
    """A collective failed because another process went away: torch's DistError (by name, so
    that this module needs no torch) or a RuntimeError from the gloo/NCCL transport."""
    if any(kind.__name__ == "DistError" for kind in type(err).__mro__):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(mark in text for mark in _LOST_PEER_MARKS)


def is_out_of_memory(err: BaseException) -> bool:
    """The batch did not fit: torch's OutOfMemoryError (CUDA) or the CPU allocator's RuntimeError."""
    if any(kind.__name__ == "OutOfMemoryError" for kind in type(err).__mro__):
        return True
    return isinstance(err, (RuntimeError, MemoryError)) and (
        isinstance(err, MemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(err)
    )


def exit_status(err: BaseException) -> int | None:
    """The exit status for an error that ends a run in one line, or None (a bug: traceback)."""
    for kind, status in EXIT_STATUS:
        if isinstance(err, kind):
            return status
    if is_lost_peer(err):
        return EXIT_LOST_PEER
    if is_out_of_memory(err):
        return 2
    return None


def one_line(err: BaseException) -> str:
    """The line the command line prints for an error that has an exit status."""
    if exit_status(err) == EXIT_LOST_PEER and not isinstance(err, (UserError, DivergenceError, Preempted)):
        return (f"lost contact with another process ({first_line(err, 200)}); "
                "restart with --resume auto to continue from the last checkpoint")
    if is_out_of_memory(err) and not isinstance(err, UserError):
        return (f"out of memory ({first_line(err, 160)}); the micro-batch defaults to the whole per-process "
                "batch: pass a smaller --micro-batch (e.g. 128) to accumulate it in pieces")
    return first_line(err)


def on_every_rank(err: UserError) -> UserError:
    """Mark an error that every process raises alike (it follows from the config and the world size
    alone), so that only rank 0 prints it; the others still exit with its status, silently."""
    err.every_rank = True  # type: ignore[attr-defined]
    return err


def printed_on_rank(err: BaseException, rank: int) -> bool:
    """Whether ``rank`` prints ``err``'s line: rank 0 always; another rank unless every rank raised it alike."""
    return rank == 0 or not getattr(err, "every_rank", False)


def first_line(err: object, limit: int | None = None) -> str:
    """The first non-empty line of an error's message, or its type name when there is none."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text[:limit] if limit else text
