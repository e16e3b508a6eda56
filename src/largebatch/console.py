"""One line to a terminal or pipe in one write(2), so that lines from several processes never merge.

``print(text, file=sys.stderr)`` is two writes (the text, then the newline) where Python's
streams are unbuffered (PYTHONUNBUFFERED=1, inherited by torchrun's children); two ranks'
lines then interleave inside a line. POSIX makes a write of at most PIPE_BUF bytes to a pipe
atomic, so each line goes out as one ``os.write`` of at most that many bytes.
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import TextIO

__all__ = ["ATOMIC_BYTES", "write_line"]

ATOMIC_BYTES = getattr(select, "PIPE_BUF", 512)  # POSIX guarantees at least 512


def _clip(data: bytes) -> bytes:
    """At most ATOMIC_BYTES, still ending in the line's last character (a newline or nothing)."""
    if len(data) <= ATOMIC_BYTES:
        return data
    end = data[-1:] if data.endswith((b"\n", b"\r")) else b""
    return data[: ATOMIC_BYTES - len(end)].decode("utf-8", "ignore").encode() + end


def write_line(stream: TextIO, text: str) -> None:
    """Write ``text`` (a whole line, newline included) to ``stream`` as one atomic write.

    Streams without a file descriptor (a StringIO, a test's capture) get one ``write`` call.
    Errors (a closed pipe) propagate: the caller decides whether they matter.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        stream.write(text)
        stream.flush()
        return
    with contextlib.suppress(OSError, ValueError):
        stream.flush()  # whatever the stream buffered goes first, in order
    encoding = getattr(stream, "encoding", None) or "utf-8"
    data = _clip(text.encode(encoding, "replace"))
    view = memoryview(data)
    while view:  # a terminal or file may take part of it; a pipe takes all of it at once
        view = view[os.write(fd, view):]
