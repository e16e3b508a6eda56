"""Faults: corrupt, malicious and unwritable checkpoints, divergence, SIGKILL and SIGTERM under torchrun."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import signal
import time

import pytest
import torch
from support.checkpoints import Exploit, newest, same_weights, weights
from support.runs import TINY_DATA, cli_args, run_process, start_process, tiny_config

from largebatch import checkpoint as ckpt
from largebatch.cli import main
from largebatch.config import load_config
from largebatch.trainer import train


def test_truncated_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys):
    straight = tmp_path / "straight"
    train(load_config(None, list(tiny_config(straight, checkpoint_every=2).items())))
    run = tmp_path / "run"
    train(load_config(None, list(tiny_config(run, checkpoint_every=2).items())))
    last = newest(run)
    assert last.name == "step_00000008.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a crash mid-write, say
    assert main([*cli_args(tiny_config(run, checkpoint_every=2)), "--resume", "auto"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {last} is corrupt or truncated" in out
    assert "resumed from" in out and "step_00000006.pt at step 6" in out
    assert same_weights(weights(newest(run)), weights(newest(straight)))


def test_checkpoint_without_integrity_record_is_not_trusted(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "step_00000001.pt", {"x": torch.ones(2)})
    path.with_suffix(".pt.sha256").unlink()
    with pytest.raises(ckpt.CheckpointError, match="has no integrity record"):
        ckpt.load_checkpoint(path)
    assert ckpt.newest_valid(tmp_path) is None


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    evil = run / "checkpoints" / "step_00000004.pt"
    evil.parent.mkdir(parents=True)
    data = pickle.dumps({"model": Exploit(marker), "step": 4})
    evil.write_bytes(data)
    (evil.parent / (evil.name + ".sha256")).write_text(f"{hashlib.sha256(data).hexdigest()}  {evil.name}\n")
    with pytest.raises(ckpt.CheckpointError, match="was refused: it holds more than weights and plain data"):
        ckpt.load_checkpoint(evil)
    code = main([*cli_args(tiny_config(run, checkpoint_every=2)), "--resume", str(evil)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"largebatch: error: checkpoint {evil} was refused")
    assert not marker.exists()


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_write = ckpt._atomic_write

    def failing_write(path, data, before_commit=None):
        if path.name == "step_00000006.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, data, before_commit)

    monkeypatch.setattr(ckpt, "_atomic_write", failing_write)
    code = main(cli_args(tiny_config(run, checkpoint_every=2)))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    target = run / "checkpoints" / "step_00000006.pt"
    assert code == 2
    reason = "No space left on device; earlier checkpoints are kept"
    assert err == f"largebatch: error: cannot write checkpoint {target}: {reason}"
    assert [p.name for p in ckpt.step_checkpoints(run / "checkpoints")] == ["step_00000002.pt", "step_00000004.pt"]
    ckpt.verify_checkpoint(run / "checkpoints" / "step_00000004.pt")
    assert not list((run / "checkpoints").glob("*.tmp"))


def test_unwritable_run_directory_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = main(cli_args(tiny_config(blocker / "run", checkpoint_every=2)))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"largebatch: error: cannot write the run directory {blocker / 'run'}")


def test_divergence_stops_with_step_and_lr_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    pairs = tiny_config(run, **{"optim.name": "sgd", "optim.lr": 1e6, "schedule.warmup_epochs": 0.5,
                                "checkpoint_every": 1, "epochs": 4})
    code = main(cli_args(pairs))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 3
    assert err.startswith("largebatch: error: non-finite loss or gradient at step ")
    bad_step = int(err.split("at step ")[1].split()[0])
    assert f"(lr {_lr_at(pairs, bad_step - 1):.4g})" in err  # steps counted from 1, as in metrics.jsonl
    kept = ckpt.step_checkpoints(run / "checkpoints")
    assert kept and int(kept[-1].stem.split("_")[1]) <= bad_step
    for path in kept:
        state = weights(path)
        assert all(torch.isfinite(t).all() for t in state.values())


def _lr_at(pairs: dict[str, object], step: int) -> float:
    from largebatch.trainer import build_schedule

    config = load_config(None, list(pairs.items()))
    return build_schedule(config, 512 // 128)(step)


# ---- whole processes under torchrun ------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_points_then_restart_gives_identical_weights(tmp_path):
    pairs = dict(tiny_config(tmp_path / "straight"), checkpoint_every=1, epochs=3)
    done = run_process(cli_args(pairs), torchrun=True)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = weights(newest(tmp_path / "straight"))
    total = 12
    rng = torch.Generator().manual_seed(int(time.time()))
    kill_step = int(torch.randint(2, total - 1, (1,), generator=rng))
    points = [("step", kill_step, 1), ("checkpoint", kill_step + 1, 0)]
    for point, step, rank in points:
        run = tmp_path / f"{point}_{step}"
        marker = tmp_path / f"{point}_{step}.fired"
        fault = {"LARGEBATCH_FAULT": f"{point}:{step}:{rank}:{marker}"}
        args = [*cli_args(dict(pairs, out=str(run))), "--resume", "auto"]
        done = run_process(args, torchrun=True, env=fault, torchrun_options=["--max-restarts", "1"])
        assert done.returncode == 0, f"{point} {step}: {done.stderr[-2000:]}"
        assert marker.exists(), "the fault never fired"
        assert same_weights(weights(newest(run)), reference), f"kill at {point} {step} rank {rank}"
    # by hand: the run dies, a person restarts it with --resume auto
    run = tmp_path / "by_hand"
    fault = {"LARGEBATCH_FAULT": f"step:{kill_step}:0:{tmp_path / 'by_hand.fired'}"}
    args = cli_args(dict(pairs, out=str(run)))
    assert run_process(args, torchrun=True, env=fault).returncode != 0
    done = run_process([*args, "--resume", "auto"], torchrun=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert same_weights(weights(newest(run)), reference)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torchrun", "process group"])
def test_sigterm_writes_a_checkpoint_at_the_step_boundary_and_all_ranks_exit(tmp_path, target):
    """A scheduler's stop: SIGTERM to torchrun, or to its whole process group (timeout, Slurm, Kubernetes)."""
    run = tmp_path / "run"
    long = dict(tiny_config(run), **{"data.options": dict(TINY_DATA, num_train=512 * 400), "epochs": 1,
                              "checkpoint_every": 10_000, "log_every": 1})
    proc = start_process(cli_args(long), torchrun=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be pre-empted"
    if target == "torchrun":
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    # torchrun re-raises the signal as its own failure: it exits 1, not 143 (what a scheduler sees);
    # every worker exits 143 after the checkpoint, and says so on stderr
    assert proc.returncode == 1, stderr[-2000:]
    assert f"SignalException: Process {proc.pid} got signal: {int(signal.SIGTERM)}" in stderr
    lines = [line for line in stderr.splitlines() if "stopped by SIGTERM; checkpoint written at step" in line]
    assert len(lines) == 2 and sum(line.startswith("largebatch: error: [rank 1] ") for line in lines) == 1
    saved = newest(run)
    state = ckpt.load_checkpoint(saved)
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert state["step"] == last_logged < 1600
    assert int(saved.stem.split("_")[1]) == state["step"]
    assert all(f"checkpoint written at step {state['step']} in {run}" in line for line in lines)
