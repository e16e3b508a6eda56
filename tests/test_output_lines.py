"""Lines printed by several processes at once stay whole (issue 21, item 1).

A torchrun rank's error line used to go out as two write(2) calls where Python's stderr is
unbuffered, and two ranks' lines merged into one. Each line is now one write below PIPE_BUF.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import largebatch.console as console
from largebatch.console import ATOMIC_BYTES, write_line

SRC = str(Path(__file__).resolve().parents[1] / "src")
LINES = 3000

WRITER = """
import os, sys
from largebatch.cli import _error
from largebatch.metrics import Progress
rank = os.environ["RANK"]
progress = Progress(0, enabled=False, is_main=True, stream=sys.stdout)
for i in range({lines}):
    _error(f"error line {{i}} from this process " + "x" * 60)
    progress.message(f"message line {{i}} from rank {{rank}} " + "y" * 60)
"""


def test_two_unbuffered_processes_writing_into_one_pipe_never_merge_lines():
    read_end, write_end = os.pipe()
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=SRC)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER.format(lines=LINES)], stdout=write_end, stderr=write_end,
                         env=dict(env, RANK=str(rank)))
        for rank in (1, 2)
    ]
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = text.splitlines()
    whole = re.compile(r"largebatch: error: \[rank [12]\] error line \d+ from this process x{60}"
                       r"|message line \d+ from rank [12] y{60}")
    merged = [line for line in lines if not whole.fullmatch(line)]
    assert merged == []
    assert len(lines) == 2 * 2 * LINES


def test_the_writer_makes_one_write_call_per_line(monkeypatch, tmp_path):
    calls = []
    real_write = os.write
    monkeypatch.setattr(console.os, "write", lambda fd, data: calls.append(bytes(data)) or real_write(fd, data))
    with open(tmp_path / "out", "w") as stream:
        write_line(stream, "largebatch: error: one line\n")
        write_line(stream, "z" * (3 * ATOMIC_BYTES) + "\n")
    assert calls[0] == b"largebatch: error: one line\n"
    assert len(calls) == 2  # the long line too: clipped below the atomic size, still one call
    assert len(calls[1]) == ATOMIC_BYTES and calls[1].endswith(b"\n")
    assert (tmp_path / "out").read_bytes() == calls[0] + calls[1]


def test_a_stream_without_a_descriptor_gets_the_line_whole():
    buffer = io.StringIO()
    write_line(buffer, "a line\n")
    assert buffer.getvalue() == "a line\n"
