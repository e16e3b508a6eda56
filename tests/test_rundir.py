"""The run directory never loses a run: refusals, the lock, forks, leftovers of crashes and refused runs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support.checkpoints import Exploit, newest, same_weights, weights
from support.images import jpeg_folder
from support.runs import TINY_DATA, cli_args, finished_run, run_cli, run_process, snapshot, start_process, tiny_config

from largebatch import checkpoint as ckpt
from largebatch.cli import main


def test_resume_auto_without_a_usable_checkpoint_refuses_and_keeps_the_run(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    for digest in (run / "checkpoints").glob("*.sha256"):
        digest.unlink()  # every checkpoint now fails verification
    before = snapshot(run)
    code, line, _ = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 2
    assert line == (f"largebatch: error: run directory {run} holds a run but none of its 5 checkpoint(s) can be "
                    "used; pass --overwrite to start it again from step 0")
    assert snapshot(run) == before
    # another config is refused for what it is, whether or not a checkpoint is usable
    code, line, _ = run_cli([*cli_args(dict(pairs, **{"optim.lr": 3.0})), "--resume", "auto"], capsys)
    assert code == 2 and line == (f"largebatch: error: cannot resume {run}: the config differs in optim.lr; "
                                  "use a new --out or --overwrite")
    assert snapshot(run) == before
    assert main([*cli_args(pairs), "--resume", "auto", "--overwrite"]) == 0  # asked for: starts again
    assert newest(run).name == "step_00000008.pt"


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    long = dict(tiny_config(run), **{"data.options": dict(TINY_DATA, num_train=512 * 400), "epochs": 1,
                                     "checkpoint_every": 10_000, "log_every": 1})
    first = start_process(cli_args(long), stdout=subprocess.DEVNULL, text=False, start_new_session=False)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and (not metrics.exists() or not metrics.read_text()):
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        rows = len(metrics.read_text().splitlines())
        code, line, _ = run_cli([*cli_args(long), "--resume", "auto"], capsys)
        assert code == 2
        assert line == (f"largebatch: error: run directory {run} is in use by process {first.pid} on "
                        f"{socket.gethostname()}; wait for that run to end (or stop it), or choose another --out")
        assert first.poll() is None and len(metrics.read_text().splitlines()) >= rows  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the operating system dropped the dead process's lock: the directory can be used again
    assert main([*cli_args(tiny_config(run, checkpoint_every=2)), "--overwrite"]) == 0


def test_resume_from_another_runs_checkpoint_forks_it_into_the_new_directory(tmp_path, capsys):
    source, pairs = finished_run(tmp_path, "source")
    before = snapshot(source)
    fork = tmp_path / "fork"
    start = source / "checkpoints" / "step_00000004.pt"
    code, _, out = run_cli([*cli_args(dict(pairs, out=str(fork))), "--resume", str(start)], capsys)
    assert code == 0
    assert f"forking the run: continuing {start} in {fork}" in out
    assert snapshot(source) == before  # the source run is untouched
    assert same_weights(weights(newest(fork)), weights(newest(source)))  # as if never interrupted
    steps = [r["step"] for r in map(json.loads, (fork / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # the source's rows up to step 4, then the fork's own
    # a directory that already holds a run is not forked into without --overwrite
    code, line, _ = run_cli([*cli_args(dict(pairs, out=str(fork))), "--resume", str(start)], capsys)
    assert code == 2 and line == (f"largebatch: error: run directory {fork} already holds a run; choose a new "
                                  f"--out to continue {start} there, or pass --overwrite to replace it")


def test_half_written_checkpoints_from_a_crash_are_removed_when_the_run_is_reopened(tmp_path, capsys):
    straight, pairs = finished_run(tmp_path, "straight")
    run = tmp_path / "run"
    fault = {"LARGEBATCH_FAULT": "checkpoint:4:0"}  # killed with step 4's data on disk, unrenamed
    died = run_process(cli_args(dict(pairs, out=str(run))), env=fault, text=False)
    assert died.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in (run / "checkpoints").glob(".step_00000004.pt.*.tmp"))
    assert len(leftovers) == 1
    code, _, out = run_cli([*cli_args(dict(pairs, out=str(run))), "--resume", "auto"], capsys)
    assert code == 0
    assert f"removed 1 half-written file(s) left by an interrupted write: {leftovers[0]}" in out
    assert not list((run / "checkpoints").glob(".*.tmp"))
    assert same_weights(weights(newest(run)), weights(newest(straight)))


def test_a_run_refused_at_its_first_batch_leaves_nothing_behind(tmp_path, capsys):
    images = tmp_path / "images"
    jpeg_folder(images, corrupt=True)  # 8 training images, one of them bad: found in the first batch
    out = tmp_path / "runs" / "a"
    args = ["train", "--data", "imagefolder", "--data-dir", str(images), "--batch-size", "8", "--epochs", "1",
            "--model", "mlp", "--set", "threads=1", "--no-progress", "--out", str(out),
            "--set", "data.options={image_size: 16, workers: 0}"]
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and line.startswith("largebatch: error: unreadable image")
    assert not (tmp_path / "runs").exists()  # every directory it made is gone
    # in a directory that was there before, only what the refused run created goes
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and line.startswith("largebatch: error: unreadable image")
    assert snapshot(out) == {"notes.txt": b"mine"} and [p.name for p in out.iterdir()] == ["notes.txt"]
    # the corrected rerun is not refused as "already holds a run"
    shutil.copyfile(images / "train" / "dog" / "1.jpg", images / "train" / "dog" / "2.jpg")
    code, line, _ = run_cli(args, capsys)
    assert code == 0, line
    assert newest(out).exists()
    # --overwrite by a run refused at its first batch: the run it was replacing is put back
    (images / "train" / "dog" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    before = snapshot(out)
    code, line, _ = run_cli([*args, "--overwrite"], capsys)
    assert code == 2 and line.startswith("largebatch: error: unreadable image")
    assert snapshot(out) == before and not (out / ".replaced").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_resume_auto_skips_a_newest_checkpoint_refused_as_unsafe_and_never_runs_it(tmp_path, capsys):
    straight, _ = finished_run(tmp_path, "straight")
    run, pairs = finished_run(tmp_path, "run")
    marker = tmp_path / "pwned"
    evil = newest(run)  # step 8, replaced by a pickle that runs a command, with a matching digest
    data = pickle.dumps({"model": Exploit(marker), "step": 8})
    evil.write_bytes(data)
    evil.with_suffix(".pt.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {evil.name}\n")
    code, _, out = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 0
    assert f"checkpoint {evil} was refused: it holds more than weights and plain data" in out
    assert "trying the previous one" in out and "step_00000006.pt at step 6" in out
    assert not marker.exists()
    assert same_weights(weights(ckpt.step_path(run / "checkpoints", 8)), weights(newest(straight)))


def test_a_corrupt_run_config_is_one_line_naming_the_file(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    (run / "config.yaml").write_text("optim: [unclosed\n")
    code, line, _ = run_cli([*cli_args(pairs), "--resume", "auto"], capsys)
    assert code == 2 and line.startswith(f"largebatch: error: run config {run / 'config.yaml'} is not valid YAML")


@contextlib.contextmanager
def read_only(directory: Path):
    """The directory made read-only for this process: by mode bits, or (as root) a read-only bind mount."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [directory, *directory.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    mounted = subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot make a read-only directory here (root without mount)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_resume_or_overwrite_in_a_read_only_directory_is_one_line(tmp_path, capsys):
    run, pairs = finished_run(tmp_path, "run")
    before = snapshot(run)
    with read_only(run):
        for flag in ("--resume", "--overwrite"):
            extra = ["--resume", "auto"] if flag == "--resume" else ["--overwrite"]
            code, line, _ = run_cli([*cli_args(pairs), *extra], capsys)
            assert code == 2
            assert line.startswith(f"largebatch: error: cannot write the run directory {run}: ")
            assert line.split(": ")[-1] in ("Read-only file system", "Permission denied")
    assert snapshot(run) == before
