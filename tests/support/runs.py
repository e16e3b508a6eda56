"""Tiny training configs and the ways tests start a run: in this process, as a subprocess, or as
two processes under torchrun. One recipe and one launcher, so every test trains the same thing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import largebatch
from largebatch.cli import main
from largebatch.config import TrainConfig, load_config
from largebatch.trainer import train

# 512 training examples of 1x8x8 in 4 classes: batch 128 gives 4 steps per epoch
TINY_DATA = {"shape": [1, 8, 8], "num_classes": 4, "num_train": 512, "num_eval": 128, "pool_size": 512}

# the quick options of the command line tests: the smallest model, one thread, no progress bar
QUICK = ["--model", "mlp", "--set", "threads=1", "--no-progress"]

# BatchNorm, dropout, augmentation and accumulation: every kind of state a step carries
STATEFUL_RUN = {
    "model.name": "alexnet_bn_small",
    "model.options": {"width": 4, "hidden": 16},
    "data.options": {"shape": [1, 28, 28], "num_classes": 4, "num_train": 512, "num_eval": 128, "pool_size": 512},
    "data.augment": True,
    "micro_batch": 64,
    "log_every": 1,
}

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
CLI = ["-m", "largebatch.cli"]


def tiny_config(out: Path, **overrides) -> dict[str, object]:
    """A 2-epoch MLP on TINY_DATA with LARS (8 steps), as config pairs; overrides replace or add keys.

    Checkpoints come at the config's default (each epoch's end) unless ``checkpoint_every`` is given.
    """
    pairs: dict[str, object] = {
        "model.name": "mlp", "model.options": {"hidden": 32, "depth": 2},
        "data.name": "synthetic", "data.options": TINY_DATA, "data.augment": False,
        "batch_size": 128, "epochs": 2, "optim.lr": 2.0, "optim.trust_coefficient": 0.01,
        "schedule.warmup_epochs": 1.0, "precision": "fp32", "progress": False, "threads": 1,
        "out": str(out),
    }
    pairs.update(overrides)
    if pairs.get("optim.name", "lars") != "lars" and "optim.trust_coefficient" not in overrides:
        del pairs["optim.trust_coefficient"]  # LARS-only: refused for lamb and sgd
    return pairs


def config_of(pairs: dict[str, object]) -> TrainConfig:
    return load_config(None, list(pairs.items()))


def cli_args(pairs: dict[str, object]) -> list[str]:
    """``train --set key=value ...``: the same config through the command line."""
    args = ["train"]
    for key, value in pairs.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def synthetic_args(tmp_path: Path, *extra: str, **options) -> list[str]:
    """Command-line options of a one-epoch run on 64 synthetic examples (3 classes) in tmp_path/run."""
    data = {"shape": [1, 8, 8], "num_classes": 3, "num_train": 64, "num_eval": 16, "pool_size": 64, **options}
    return ["--data", "synthetic", "--set", f"data.options={json.dumps(data)}", "--batch-size", "32",
            "--epochs", "1", "--out", str(tmp_path / "run"), *QUICK, *extra]


class StopsAtStep:
    """Mixin for a Trainer subclass: the trainer asks itself to stop, as SIGTERM would, once it
    reaches step ``stop_at`` (set on the subclass)."""

    stop_at = 0

    def train_step(self, micro_batches):
        out = super().train_step(micro_batches)
        if self.step + 1 == self.stop_at:
            self._stop_requested = True
        return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """The command line in this process: exit status, the last line on stderr, and stdout."""
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    return code, (lines[-1] if lines else ""), captured.out


def finished_run(tmp_path: Path, name: str, **overrides) -> tuple[Path, dict[str, object]]:
    """tmp_path/name trained to its end, with a checkpoint every other step, all of them kept."""
    pairs = tiny_config(tmp_path / name, **{"checkpoint_every": 2, "keep_checkpoints": 10, **overrides})
    train(config_of(pairs))
    return tmp_path / name, pairs


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under the directory and its bytes: equal snapshots mean nothing changed."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- other processes ----------------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    """This environment with one OpenMP thread and the code under test first on PYTHONPATH."""
    src = str(Path(largebatch.__file__).resolve().parents[1])
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def command(args: list[str], *, torchrun: bool = False, torchrun_options: list[str] = (),
            program: list[str] = CLI) -> list[str]:
    """``python -m largebatch.cli ARGS``, or the same under ``torchrun --standalone`` as 2 processes;
    ``program`` replaces ``-m largebatch.cli`` (a script path, say)."""
    launcher = [*TORCHRUN, *torchrun_options] if torchrun else [sys.executable]
    return [*launcher, *program, *args]


def run_process(args: list[str], *, torchrun: bool = False, torchrun_options: list[str] = (),
                program: list[str] = CLI, env: dict[str, str] | None = None, timeout: float = 300,
                **kwargs) -> subprocess.CompletedProcess:
    """Run to the end; output captured as text unless kwargs say otherwise; env adds to cli_env()."""
    options = {"capture_output": True, "text": True, **kwargs}
    if "stdout" in kwargs or "stderr" in kwargs:
        del options["capture_output"]
    return subprocess.run(command(args, torchrun=torchrun, torchrun_options=torchrun_options, program=program),
                          env=cli_env(**(env or {})), timeout=timeout, **options)


def start_process(args: list[str], *, torchrun: bool = False, env: dict[str, str] | None = None,
                  **kwargs) -> subprocess.Popen:
    """Start in a session of its own (a signal can reach the whole group); stdout and stderr piped
    as text unless kwargs say otherwise; env adds to cli_env()."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "start_new_session": True,
               **kwargs}
    return subprocess.Popen(command(args, torchrun=torchrun), env=cli_env(**(env or {})), **options)


def paused_pid(proc: subprocess.Popen, marker: Path, timeout: float = 120) -> int:
    """The pid written by the process waiting at the pause point."""
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text().strip()):
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before its pause: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the run never reached its pause")
        time.sleep(0.05)
    return int(marker.read_text())
