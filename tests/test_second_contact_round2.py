"""Issue 22's misleading messages and issue 23 item 17, second round: every suggested command is run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.runs import cli_env, paused_pid, run_cli, snapshot, synthetic_args

from largebatch import checkpoint as ckpt
from largebatch.cli import main


def finished(tmp_path: Path, name: str = "a", *extra: str) -> Path:
    args = synthetic_args(tmp_path, *extra)
    args[args.index("--out") + 1] = str(tmp_path / name)
    assert main(["train", *args]) == 0
    return tmp_path / name


def with_out(args: list[str], out: Path | None) -> list[str]:
    """``args`` with --out replaced by ``out`` (or left out)."""
    i = args.index("--out")
    return args[:i] + ([] if out is None else ["--out", str(out)]) + args[i + 2:]


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"][-1]


# ---- 1: a fork with a changed schedule says what is possible ------------------------------------

def test_a_fork_with_more_epochs_says_what_is_possible_and_each_suggestion_works(tmp_path, capsys):
    source = finished(tmp_path)
    capsys.readouterr()
    step = ckpt.step_checkpoints(source / "checkpoints")[-1]
    more = with_out(synthetic_args(tmp_path, "--epochs", "2"), tmp_path / "b")
    code, line, _ = run_cli(["train", *more, "--resume", str(step)], capsys)
    assert code == 2
    assert line.startswith(f"largebatch: error: cannot continue {step} in {tmp_path / 'b'}: the config differs in "
                           "epochs, and a run continues only with the config it was trained with")
    assert "new --out" not in line and "--overwrite" not in line
    assert "without --resume" in line and "cannot be extended" in line
    assert not (tmp_path / "b").exists()
    # "without --resume": a new run with the new settings
    assert main(["train", *more]) == 0
    # "fork it unchanged": the same command without the changed setting
    same = with_out(synthetic_args(tmp_path), tmp_path / "c")
    assert main(["train", *same, "--resume", str(step)]) == 0
    assert "forking the run" in capsys.readouterr().out


# ---- 2: a bad image after the first step ----------------------------------------------------------

def _image_folder(root: Path) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (20, 20), (40 * i, 90, 200)).save(root / split / cls / f"{i}.jpg")
    bad = root / "train" / "dog" / "2.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return bad


def _step_reading(images: Path, bad: Path, seed: int) -> int:
    """The 1-based step (batch 2) whose batch holds ``bad``, as the skipping loader reports it."""
    from largebatch.data.imagefolder import imagefolder

    source = imagefolder(images, "cpu", seed, workers=0, image_size=16, on_bad_image="skip")
    for step, _ in enumerate(source.train_batches(0, 2, 2, 0, 1), start=1):
        if str(bad) in source.bad_images:
            return step
    raise AssertionError("the bad image was never read")


def test_a_bad_image_after_the_first_step_leaves_nothing_and_the_hint_works(tmp_path, capsys):
    images = tmp_path / "images"
    bad = _image_folder(images)
    seed = next(s for s in range(20) if _step_reading(images, bad, s) >= 2)  # found after the first step
    out = tmp_path / "runs" / "a"
    args = ["train", "--data", "imagefolder", "--data-dir", str(images), "--batch-size", "2", "--epochs", "1",
            "--seed", str(seed), "--model", "mlp", "--set", "threads=1", "--set", "log_every=1", "--no-progress",
            "--out", str(out), "--set", "data.options={image_size: 16, workers: 0}"]
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and line.startswith(f"largebatch: error: unreadable image {bad}")
    assert "--set data.options.on_bad_image=skip" in line
    assert not (tmp_path / "runs").exists()  # the directories it made are gone
    out.mkdir(parents=True)  # a directory that was there before keeps what it held
    (out / "notes.txt").write_text("mine")
    code, line, _ = run_cli(args, capsys)
    assert code == 2 and snapshot(out) == {"notes.txt": b"mine"}
    code, line, _ = run_cli([*args, "--set", "data.options.on_bad_image=skip"], capsys)  # the hint, as given
    assert code == 0, line
    assert ckpt.step_checkpoints(out / "checkpoints") and (out / "notes.txt").read_text() == "mine"


# ---- 3: --resume DIR ----------------------------------------------------------------------------

def test_resume_takes_a_run_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = finished(tmp_path, "a", "--set", "checkpoint_every=1")
    last = ckpt.step_checkpoints(run / "checkpoints")[-1]
    reference = ckpt.load_checkpoint(last)["model"]
    last.unlink()
    last.with_suffix(".pt.sha256").unlink()  # as after a crash before the last step's checkpoint
    capsys.readouterr()
    args = synthetic_args(tmp_path, "--set", "checkpoint_every=1")
    code, line, out = run_cli(["train", *with_out(args, None), "--resume", str(run)], capsys)
    assert code == 0, line
    assert f"resumed from {run / 'checkpoints' / 'step_00000001.pt'} at step 1" in out
    again = ckpt.load_checkpoint(ckpt.step_checkpoints(run / "checkpoints")[-1])["model"]
    assert all(bool((again[k] == reference[k]).all()) for k in reference)
    assert not (tmp_path / "runs").exists()  # continued where it lives, not in the default --out
    # with another --out: a fork of its newest checkpoint
    code, line, out = run_cli(["train", *with_out(args, tmp_path / "b"), "--resume", str(run)], capsys)
    assert code == 0, line
    assert f"forking the run: continuing {last} in {tmp_path / 'b'}" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    code, line, _ = run_cli(["train", *with_out(args, tmp_path / "c"), "--resume", str(empty)], capsys)
    assert code == 2
    assert line == (f"largebatch: error: --resume {empty}: a directory without checkpoints; give a run directory "
                    "(its newest valid checkpoint), a checkpoint file, or auto")


# ---- 4: --resume auto on a finished run ---------------------------------------------------------

def test_resume_auto_on_a_finished_run_says_it_is_finished_and_how_to_train_longer(tmp_path, capsys):
    run = finished(tmp_path)
    capsys.readouterr()
    args = synthetic_args(tmp_path)
    code, _, out = run_cli(["train", *with_out(args, run), "--resume", "auto"], capsys)
    assert code == 0
    said = out.strip().splitlines()[-1]
    top1 = last_eval(run)["top1"]
    assert said.startswith(f"run {run} is already finished (step 2 of 2, top-1 {top1:.2f}% at its last evaluation)")
    assert str(run / "plots") in said and str(run / "metrics.csv") in said
    assert "--epochs" in said and "new --out" in said
    # the way to train longer, as said: a new run with more epochs in a new --out
    assert main(["train", *with_out(synthetic_args(tmp_path, "--epochs", "2"), tmp_path / "longer")]) == 0


# ---- 5: a batch that does not divide, under torchrun ----------------------------------------------

@pytest.mark.slow
def test_torchrun_with_a_batch_that_does_not_divide_is_said_once_by_rank_0(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "largebatch.cli", "train", *synthetic_args(tmp_path, "--batch-size", "31")]
    done = subprocess.run(cmd, env=dict(cli_env(), OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("largebatch:")]
    assert lines == ["largebatch: error: batch_size 31 is not divisible by world size 2; "
                     "choose a batch_size that is a multiple of 2 (e.g. 30 or 32)"]
    assert not (tmp_path / "run").exists()


def test_an_error_every_rank_raises_alike_is_printed_by_rank_0_only():
    from largebatch.config import ConfigError, batch_plan, load_config
    from largebatch.errors import UserError, printed_on_rank

    config = load_config(None, [("batch_size", 31)])
    with pytest.raises(ConfigError) as refused:
        batch_plan(config, 2)
    assert printed_on_rank(refused.value, 0) and not printed_on_rank(refused.value, 1)
    with pytest.raises(ConfigError) as refused:
        batch_plan(load_config(None, [("batch_size", 32), ("micro_batch", 5)]), 2)
    assert printed_on_rank(refused.value, 0) and not printed_on_rank(refused.value, 1)
    local = UserError("a file only this host lacks")  # may differ between ranks: each says its own
    assert printed_on_rank(local, 0) and printed_on_rank(local, 1)


# ---- 6: a sweep's error names what sweep accepts --------------------------------------------------

def test_a_sweep_cell_of_another_config_advises_what_sweep_accepts(tmp_path, capsys):
    spec = {"base": {"model": {"name": "mlp", "options": {"hidden": 8}},
                     "data": {"name": "synthetic", "augment": False,
                              "options": {"shape": [1, 8, 8], "num_classes": 3, "num_train": 64, "num_eval": 16,
                                          "pool_size": 64}},
                     "epochs": 1, "precision": "fp32", "threads": 1},
            "batch_sizes": [32], "seeds": [0], "optimizers": {"lars": {"lrs": [1.0]}}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "sweep"
    assert main(["sweep", "--spec", str(spec_file), "--out", str(out)]) == 0
    (cell,) = (out / "cells").iterdir()
    (cell / "result.json").unlink()  # stopped before its result was written
    sums = {p: p.read_bytes() for p in (cell / "checkpoints").glob("*.sha256")}
    for path in sums:
        path.unlink()  # and its checkpoints cannot be verified: train's refusal, in sweep's words
    capsys.readouterr()
    assert main(["sweep", "--spec", str(spec_file), "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"largebatch: error: sweep cell {cell}: run directory {cell} holds a run but none of its")
    assert "--overwrite" not in line and line.endswith("use a new --out for the sweep, or delete that directory to "
                                                       "rerun it")
    for path, data in sums.items():
        path.write_bytes(data)
    assert main(["sweep", "--spec", str(spec_file), "--out", str(out), "--set", "epochs=2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"largebatch: error: {cell} holds a run of another config (it differs in epochs)")
    assert "--overwrite" not in line and "--out" in line and "delete that directory" in line
    assert ckpt.step_checkpoints(cell / "checkpoints")  # nothing was deleted
    import shutil

    shutil.rmtree(cell)  # as the line says: then the sweep reruns it
    assert main(["sweep", "--spec", str(spec_file), "--out", str(out), "--set", "epochs=2"]) == 0


# ---- 7: a broken stderr keeps the exit status ---------------------------------------------------

@pytest.mark.parametrize("how", ["closed", "reader gone"])
def test_a_user_error_exits_2_even_when_stderr_is_broken(tmp_path, how):
    cmd = [sys.executable, "-m", "largebatch.cli", "train", "--epochs", "0", "--out", str(tmp_path / "run")]
    if how == "closed":
        done = subprocess.run(cmd, env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              preexec_fn=lambda: os.close(2), timeout=120)
    else:
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run(cmd, env=cli_env(), stdout=subprocess.DEVNULL, stderr=write, timeout=120)
        finally:
            os.close(write)
    assert done.returncode == 2


# ---- 8: SIGTERM while the final plots are written --------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_the_final_plots_exits_143_in_one_line_without_an_empty_plots_dir(tmp_path):
    marker = tmp_path / "paused"
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "largebatch.cli", "train", *synthetic_args(tmp_path)],
                            env={**cli_env(), "LARGEBATCH_PAUSE": f"plots:2:0:{marker}"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    os.kill(paused_pid(proc, marker), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("largebatch:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("largebatch: error: stopped by SIGTERM while writing the plots; the run is finished")
    assert not (run / "plots").exists() and not [p for p in run.iterdir() if p.name.startswith(".plots")]
    assert [p.name for p in ckpt.step_checkpoints(run / "checkpoints")] == ["step_00000002.pt"]
    # as the line says: --resume auto writes them
    done = subprocess.run([sys.executable, "-m", "largebatch.cli", "train", *synthetic_args(tmp_path),
                           "--resume", "auto"], env={**cli_env(), "LARGEBATCH_PAUSE": f"plots:2:0:{marker}"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["accuracy.png", "loss.png", "lr.png"]
