"""The exceptions that end a run without a traceback, and the exit status of each.

Kept free of torch (and of every other largebatch module) so that every floor can raise these
and the command line can map them to exit statuses without importing the trainer.
"""

from __future__ import annotations

__all__ = [
    "EXIT_REQUEUE", "EXIT_STATUS", "DivergenceError", "Interrupted", "Preempted", "RequeueRequested", "UserError",
    "exit_status",
]


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


def exit_status(err: BaseException) -> int | None:
    """The exit status for an error that ends a run in one line, or None (a bug: traceback)."""
    for kind, status in EXIT_STATUS:
        if isinstance(err, kind):
            return status
    return None
