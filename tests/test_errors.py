"""Exit statuses are decided in errors.py from the exception's kind (issue 21, item 9)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from largebatch.checkpoint import CheckpointError
from largebatch.config import ConfigError
from largebatch.errors import (
    EXIT_LOST_PEER,
    DivergenceError,
    Preempted,
    UserError,
    exit_status,
    first_line,
    is_lost_peer,
)
from largebatch.metrics import RunRecordError
from largebatch.rundir import RunDirError


@pytest.mark.parametrize(("err", "status"), [
    (ConfigError("optim.lr must be > 0"), 2),
    (CheckpointError("bad checkpoint"), 2),
    (RunDirError("holds a run"), 2),
    (RunRecordError("disk full"), 2),
    (UserError("a timed out user error stays a user error"), 2),
    (DivergenceError("loss is nan"), 3),
    (Preempted("SIGTERM"), 143),
    (dist.DistError("peer went away"), EXIT_LOST_PEER),
    (RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"), EXIT_LOST_PEER),
    (RuntimeError("Socket Timeout: timed out"), EXIT_LOST_PEER),
    (RuntimeError("shape mismatch"), None),
    (ValueError("Connection closed"), None),  # only a RuntimeError comes from the transport
    (KeyError("x"), None),
])
def test_each_error_kind_has_its_exit_status(err, status):
    assert exit_status(err) == status


def test_run_record_and_run_dir_errors_are_user_errors_not_config_errors():
    for kind in (RunRecordError, RunDirError):
        assert issubclass(kind, UserError)
        assert not issubclass(kind, ConfigError)
    assert is_lost_peer(dist.DistError("x"))


@pytest.mark.parametrize(("err", "line"), [
    (ValueError("first\nsecond"), "first"),
    (ValueError("\n\n  real line  \nrest"), "real line"),
    (ValueError(""), "ValueError"),
    (RuntimeError("   \n "), "RuntimeError"),
    (KeyError(), "KeyError"),
])
def test_first_line_is_the_first_non_empty_line_or_the_type(err, line):
    assert first_line(err) == line


def test_first_line_clips_to_a_limit():
    assert first_line(ValueError("abcdef"), 3) == "abc"


def test_out_of_memory_is_a_user_error_that_suggests_a_micro_batch():
    from largebatch.errors import one_line

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)")
    for err in (cpu, MemoryError(), torch_oom()):
        assert exit_status(err) == 2
        line = one_line(err)
        assert line.startswith("out of memory (") and "--micro-batch" in line and "\n" not in line


def torch_oom() -> BaseException:
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_a_lost_peer_line_says_how_to_continue():
    from largebatch.errors import one_line

    line = one_line(RuntimeError("[gloo] Connection closed by peer\nmore"))
    assert line == ("lost contact with another process ([gloo] Connection closed by peer); restart with --resume "
                    "auto to continue from the last checkpoint")
    assert one_line(ConfigError("a user error naming gloo")) == "a user error naming gloo"
