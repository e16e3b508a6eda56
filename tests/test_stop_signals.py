"""Stops at the next step boundary: SIGTERM, Ctrl-C (twice: at once), the scheduler's requeue signal,
a signal to one rank only, a stop during evaluation, and the steps a too-late stop loses.

Each run waits at an exact point for the test's signal (``LARGEBATCH_PAUSE``, see largebatch.faults),
so where the stop lands never depends on timing.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from support.checkpoints import newest, same_weights, weights
from support.runs import cli_args, paused_pid, run_process, start_process, tiny_config

from largebatch import checkpoint as ckpt
from largebatch.errors import EXIT_REQUEUE

pytestmark = pytest.mark.slow  # real processes stopped by real signals: make test, not test-fast

# 12 steps of 4 per epoch; log and periodic checkpoints only at epoch ends (steps 4, 8, 12)
SPARSE = {"epochs": 3, "log_every": 1000, "checkpoint_every": 0, "data.eval_batch": 16}


def start(args: list[str], pause: str, *, torchrun: bool = False, env: dict[str, str] | None = None):
    """The run, told to wait at the pause point (LARGEBATCH_PAUSE) for the test's signal."""
    return start_process(args, torchrun=torchrun, env={"LARGEBATCH_PAUSE": pause, **(env or {})})


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("largebatch: error:")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every stopped-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    done = run_process(cli_args(tiny_config(out, **SPARSE)))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def metric_rows(run: Path) -> list[dict]:
    timing = {"img_per_s", "data_time_s", "elapsed_s"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def test_ctrl_c_checkpoints_at_the_next_step_names_it_and_the_run_resumes_exactly(tmp_path, straight):
    run, marker = tmp_path / "run", tmp_path / "paused"
    args = cli_args(tiny_config(run, **SPARSE))
    proc = start(args, f"step:5:0:{marker}")
    os.kill(paused_pid(proc, marker), signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    # step 5 is neither a log step nor a periodic checkpoint: the stop did not wait for one
    assert ckpt.load_checkpoint(newest(run))["step"] == 5
    assert errors(stderr) == [f"largebatch: error: interrupted (Ctrl-C); checkpoint written at step 5 in {run}; "
                              f"continue with the same command and --resume auto (run directory {run})"]
    done = run_process([*args, "--resume", "auto"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert same_weights(weights(newest(run)), weights(newest(straight)))


def test_a_second_ctrl_c_stops_at_once_and_names_the_last_checkpoint(tmp_path):
    run, first, second = tmp_path / "run", tmp_path / "first", tmp_path / "second"
    proc = start(cli_args(tiny_config(run, **SPARSE)), f"step:5:0:{first},checkpoint:5:0:{second}")
    os.kill(paused_pid(proc, first), signal.SIGINT)  # asks for a checkpoint of step 5 ...
    os.kill(paused_pid(proc, second), signal.SIGINT)  # ... and the second Ctrl-C arrives while it is written
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    last = run / "checkpoints" / "step_00000004.pt"
    assert [p.name for p in ckpt.step_checkpoints(run / "checkpoints")] == [last.name]  # step 5 never committed
    assert errors(stderr) == [f"largebatch: error: interrupted (second Ctrl-C) at step 5 without a checkpoint of "
                              f"it; the last checkpoint is {last}; continue with the same command and "
                              f"--resume auto (run directory {run})"]


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_next_step(tmp_path, straight):
    """Agreement at every step: only rank 1 is signalled (mid-epoch, no log step), both stop at step 5."""
    run, marker = tmp_path / "run", tmp_path / "paused"
    proc = start(cli_args(tiny_config(run, **SPARSE)), f"step:5:1:{marker}", torchrun=True)
    os.kill(paused_pid(proc, marker), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    lines = errors(stderr)
    assert len(lines) == 2, stderr[-3000:]
    assert all(f"stopped by SIGTERM; checkpoint written at step 5 in {run}" in line for line in lines)
    assert ckpt.load_checkpoint(newest(run))["step"] == 5
    done = run_process([*cli_args(tiny_config(run, **SPARSE)), "--resume", "auto"])  # one process continues the two
    assert done.returncode == 0, done.stderr[-2000:]
    reference = weights(newest(straight))
    resumed = weights(newest(run))
    for key, value in reference.items():  # 2 ranks then 1: the same sums in another order
        torch.testing.assert_close(resumed[key], value, rtol=2e-5, atol=2e-6)


def test_a_stop_during_evaluation_abandons_it_and_the_resume_evaluates_first(tmp_path, straight):
    run, marker = tmp_path / "run", tmp_path / "paused"
    args = cli_args(tiny_config(run, **SPARSE))
    proc = start(args, f"eval:4:0:{marker}")  # the first of the 8 evaluation batches after step 4
    os.kill(paused_pid(proc, marker), signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert ckpt.load_checkpoint(newest(run))["step"] == 4
    assert not [r for r in metric_rows(run) if r["kind"] == "eval"]  # nothing half-evaluated was recorded
    done = run_process([*args, "--resume", "auto"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert metric_rows(run) == metric_rows(straight)  # the skipped evaluation is there, in its place
    assert same_weights(weights(newest(run)), weights(newest(straight)))


@pytest.mark.parametrize("name", ["USR1", "USR2"])
def test_the_requeue_signal_checkpoints_and_exits_with_the_requeue_status(tmp_path, name):
    run, marker = tmp_path / "run", tmp_path / "paused"
    env = {} if name == "USR1" else {"LARGEBATCH_REQUEUE_SIGNAL": name}
    proc = start(cli_args(tiny_config(run, **SPARSE)), f"step:6:0:{marker}", env=env)
    os.kill(paused_pid(proc, marker), signal.Signals[f"SIG{name}"])
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE == 75, stderr[-2000:]
    assert ckpt.load_checkpoint(newest(run))["step"] == 6
    assert errors(stderr) == [f"largebatch: error: stopped by SIG{name} (the scheduler's warning); checkpoint "
                              f"written at step 6 in {run}; exit 75 asks the job script to requeue the job, "
                              "which continues with --resume auto"]


def test_a_requeue_signal_the_trainer_cannot_catch_is_one_line_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    done = run_process(cli_args(tiny_config(run, checkpoint_every=2)), env={"LARGEBATCH_REQUEUE_SIGNAL": "KILL"})
    assert done.returncode == 2
    assert errors(done.stderr) == done.stderr.strip().splitlines()
    assert len(errors(done.stderr)) == 1 and "LARGEBATCH_REQUEUE_SIGNAL='KILL'" in done.stderr
    assert not run.exists()


def test_a_stop_too_late_for_a_checkpoint_resumes_from_the_last_one_and_counts_the_lost_steps(tmp_path, straight):
    run = tmp_path / "run"
    args = cli_args(tiny_config(run, **dict(SPARSE, log_every=1)))
    # killed after the update of step 7, before its log row; the last checkpoint is step 4's
    died = run_process(args, env={"LARGEBATCH_FAULT": "step:7"})
    assert died.returncode == -signal.SIGKILL
    done = run_process([*args, "--resume", "auto"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 step(s) logged after the checkpoint of step 4 were lost" in done.stdout + done.stderr  # 5 and 6
    assert same_weights(weights(newest(run)), weights(newest(straight)))


def test_a_requeue_signal_during_start_up_is_kept_for_the_run_not_fatal():
    """Slurm's warning can come while torch is still importing; its default action would kill the task."""
    from largebatch import stop_signals

    previous = signal.getsignal(signal.SIGUSR1)
    seen: list[int] = []
    try:
        stop_signals.hold_early()
        os.kill(os.getpid(), signal.SIGUSR1)  # before any run has its handlers
        with stop_signals.installed(lambda signum, frame: seen.append(signum)):
            assert seen == [signal.SIGUSR1]  # handed over as the run's handler is put in place
        assert seen == [signal.SIGUSR1]  # once
    finally:
        signal.signal(signal.SIGUSR1, previous)
