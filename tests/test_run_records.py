"""Records and output never stop or corrupt a run: a full disk, a torn line, a closed pipe, a log file."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys

import pytest
from support.checkpoints import newest, same_weights, weights
from support.runs import cli_args, finished_run, run_process, tiny_config

from largebatch import checkpoint as ckpt
from largebatch import metrics
from largebatch.cli import main
from largebatch.config import load_config
from largebatch.errors import UserError
from largebatch.metrics import Progress
from largebatch.trainer import Trainer


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_full_disk_while_writing_metrics_stops_in_one_line_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    straight, pairs = finished_run(tmp_path, "straight")
    run = tmp_path / "run"
    pairs = dict(pairs, out=str(run), log_every=1)
    real_append = metrics._append
    jsonl_writes = []

    def disk_fills_up(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            jsonl_writes.append(data)
            if len(jsonl_writes) == 3:  # the row of step 3: half of it reaches the disk
                real_append(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_append(fd, data)

    monkeypatch.setattr(metrics, "_append", disk_fills_up)
    code = main(cli_args(pairs))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"largebatch: error: cannot write {run / 'metrics.jsonl'}: No space left on device; "
                      f"stopped at step 4 with its checkpoint in {run / 'checkpoints'}; make room, then continue "
                      "with --resume auto")
    assert [r["step"] for r in rows(run / "metrics.jsonl")] == [1, 2]  # no torn line
    assert ckpt.load_checkpoint(newest(run))["step"] == 4
    monkeypatch.setattr(metrics, "_append", real_append)  # space again
    assert main([*cli_args(pairs), "--resume", "auto"]) == 0
    assert same_weights(weights(newest(run)), weights(newest(straight)))
    assert [r["step"] for r in rows(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, *range(5, 9)]


def test_resume_drops_a_torn_last_metrics_line_with_a_notice(tmp_path, capsys):
    straight, pairs = finished_run(tmp_path, "straight")
    run, pairs = finished_run(tmp_path, "run", epochs=2)
    jsonl = run / "metrics.jsonl"
    for path in ckpt.step_checkpoints(run / "checkpoints")[-2:]:  # back to step 4, as after a crash
        path.unlink()
    kept = [line for line in jsonl.read_text().splitlines() if json.loads(line)["step"] <= 5]
    torn = kept[-1][: len(kept[-1]) // 2]
    jsonl.write_text("\n".join(kept[:-1]) + "\n" + torn)  # the disk filled up mid-line
    capsys.readouterr()
    assert main([*cli_args(pairs), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"{jsonl}: dropped a torn last line (line {len(kept)}, from an interrupted write)" in out
    assert [r["step"] for r in rows(jsonl) if r["kind"] == "train"] == list(range(1, 9))
    assert same_weights(weights(newest(run)), weights(newest(straight)))
    # a bad line that is not the last one is not guessed at: one line naming the file and the line
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")
    for path in ckpt.step_checkpoints(run / "checkpoints")[-1:]:
        path.unlink()
    code = main([*cli_args(pairs), "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"largebatch: error: {jsonl} line 2 is not a metrics row (")
    # found while the directory is opened, where rank 0's verdict reaches every rank, not later on rank 0 alone
    with pytest.raises(UserError, match="line 2 is not a metrics row"):
        Trainer(load_config(None, list(pairs.items())), resume="auto")


def test_a_closed_pipe_on_stdout_never_stops_training(tmp_path):
    run = tmp_path / "run"
    # as `largebatch train ... | head -0`: the reader has gone before the first line is written
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = run_process(cli_args(tiny_config(run, checkpoint_every=2)), stdout=write_end, stderr=subprocess.PIPE,
                           text=False)
    finally:
        os.close(write_end)
    stderr = done.stderr
    assert done.returncode == 0, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr
    assert ckpt.load_checkpoint(newest(run))["step"] == 8


def test_progress_on_a_non_terminal_prints_a_line_every_percent_and_no_eta_before_a_rate():
    out = io.StringIO()
    progress = Progress(1000, enabled=True, stream=out)
    for step in range(1, 1001):
        progress.update(step, 0, 0.1, 1.0, 100.0)
    lines = out.getvalue().splitlines()
    assert [int(line.split()[3].split("/")[0]) for line in lines] == [1, *range(10, 1001, 10)]
    assert lines[0].endswith("left --:--")  # one step gives no rate to extrapolate from


class _ClosedPipe(io.StringIO):
    """A reader that went away: every write fails as a closed pipe does; counts the attempts."""

    attempts = 0

    def write(self, text):
        self.attempts += 1
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_progress_drops_output_it_cannot_write():
    pipe = _ClosedPipe()
    progress = Progress(10, enabled=True, stream=pipe)
    progress.message("run header")  # raises nothing
    progress.update(1, 0, 0.1, 1.0, 100.0)
    progress.message("epoch 1: eval")
    assert pipe.attempts == 1  # after the first failure nothing more is tried


def test_the_demos_closing_lines_to_a_closed_pipe_do_not_fail_a_finished_run(tmp_path, monkeypatch):
    import largebatch.trainer
    from largebatch.trainer import RunResult

    def finished(config, **kwargs):
        return RunResult(tmp_path, 8, 80.0, 99.0, 0.5, 1.0)

    monkeypatch.setattr(largebatch.trainer, "train", finished)
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
