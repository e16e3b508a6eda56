"""Run a sweep: every trial is a normal trainer run in ``OUT/cells/<trial>/``, resumable.

Per (optimizer, batch) cell the learning rate is searched on the first seed: every candidate
runs, the best final top-1 wins (ties go to the smaller rate, diverged runs never win); with
``extend_search`` a best rate at the edge of those tried is followed by one more beyond it; the
remaining seeds then run at the winning rate only. A trial is done when its run directory holds
``result.json``, written atomically after the trainer returns; a rerun of the sweep reads it
instead of training again. A run directory without it (the sweep was stopped mid-trial) is
continued from its newest checkpoint with the trainer's ``resume="auto"``. A run that diverges
is data, not a failure: it is recorded with status ``diverged`` and no top-1, and the sweep goes
on.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from largebatch.config import ConfigError, TrainConfig, config_differences, to_dict
from largebatch.data import build_dataset
from largebatch.errors import DivergenceError
from largebatch.rundir import RunDirError, config_differences_from
from largebatch.study.grid import SweepSpec, Trial, format_lr, rate_beyond_edge
from largebatch.trainer import Trainer

__all__ = [
    "RESULT_FILE", "TrialResult", "num_train_examples", "run_sweep", "run_trial", "search_cell", "select_best",
]

RESULT_FILE = "result.json"


@dataclass
class TrialResult:
    """What the report needs from one trial; ``top1`` is None for a diverged run."""

    label: str
    optimizer: str
    batch: int
    lr: float  # the candidate as written in the spec
    peak_lr: float  # after the config's scaling rule (e.g. linear from the reference batch)
    seed: int
    status: str  # "ok" or "diverged"
    top1: float | None
    top5: float | None
    steps: int  # steps trained (where it stopped, for a diverged run)
    total_steps: int
    steps_per_epoch: int
    epochs: int
    micro_batch: int
    accumulation: int
    num_train: int
    num_classes: int
    wall_s: float  # this trial's training time; for a resumed trial, the part after the resume
    resumed: bool = False
    message: str = ""

    @property
    def trial(self) -> Trial:
        return Trial(self.label, self.batch, self.lr, self.seed)


TrialFn = Callable[[Trial, TrainConfig, "str | None"], TrialResult]


def run_trial(trial: Trial, config: TrainConfig, resume: str | None) -> TrialResult:
    """One trainer run; a DivergenceError becomes a ``diverged`` result."""
    t0 = time.perf_counter()
    trainer = Trainer(config, resume=resume)
    status, message = "ok", ""
    top1 = top5 = None
    try:
        result = trainer.run()
        top1, top5 = result.top1, result.top5
        if top1 is None:
            # resumed from the final checkpoint (stopped after it was written, before result.json):
            # nothing is left to train, so evaluate the final weights, as the run's last eval did
            scores = trainer.evaluate()
            top1, top5 = scores["top1"], scores["top5"]
    except DivergenceError as err:
        status, message = "diverged", str(err)
    return TrialResult(
        label=trial.label, optimizer=config.optim.name, batch=trial.batch, lr=trial.lr,
        peak_lr=trainer.schedule.base_lr, seed=trial.seed, status=status, top1=top1, top5=top5,
        steps=trainer.step, total_steps=trainer.total_steps, steps_per_epoch=trainer.steps_per_epoch,
        epochs=config.epochs, micro_batch=trainer.micro_batch, accumulation=trainer.accumulation,
        num_train=trainer.data.num_train, num_classes=trainer.data.num_classes,
        wall_s=time.perf_counter() - t0, resumed=resume is not None, message=message,
    )


def _write_result(run_dir: Path, result: TrialResult, config: TrainConfig) -> None:
    path = run_dir / RESULT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**asdict(result), "config": to_dict(config)}, indent=1) + "\n")
    os.replace(tmp, path)


def _read_result(run_dir: Path, config: TrainConfig) -> TrialResult | None:
    """The stored result, or None when there is none (or it cannot be read: the trial reruns).

    A result from a different config (the spec changed since) is refused rather than reused.
    """
    path = run_dir / RESULT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        stored_config = data.pop("config")
        result = TrialResult(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    diffs = config_differences(stored_config, to_dict(config))
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a result for another config (it differs in {', '.join(diffs)}); "
            "use a new --out, or delete that directory to rerun it"
        )
    return result


RERUN_CELL = "use a new --out for the sweep, or delete that directory to rerun it"


def _check_cell_config(run_dir: Path, config: TrainConfig) -> None:
    """A cell's unfinished run of another config (the spec changed since) is refused, as a result is."""
    diffs = config_differences_from(run_dir / "config.yaml", config)
    if diffs:
        raise ConfigError(f"{run_dir} holds a run of another config (it differs in {', '.join(diffs)}); {RERUN_CELL}")


def select_best(results: list[TrialResult]) -> TrialResult | None:
    """The best final top-1 among runs that did not diverge; ties go to the smaller rate."""
    finished = [r for r in results if r.status == "ok" and r.top1 is not None and math.isfinite(r.top1)]
    if not finished:
        return None
    return max(finished, key=lambda r: (r.top1, -r.lr))


def num_train_examples(spec: SweepSpec) -> int:
    """The training-set size, read once up front; refuses batches larger than the data."""
    config = spec.trial_config(_first_trial(spec), "unused")
    data = build_dataset(config.data.name, root=config.data.root, device="cpu", seed=config.seed,
                         augment=False, **config.data.options)
    too_big = [b for b in spec.batch_sizes if b > data.num_train]
    if too_big:
        raise ConfigError(f"sweep spec: batch {too_big[0]} exceeds the training set ({data.num_train} examples)")
    return data.num_train


def _first_trial(spec: SweepSpec) -> Trial:
    opt = spec.optimizers[0]
    batch = spec.batch_sizes[0]
    return Trial(opt.label, batch, opt.lrs[batch][0], spec.seeds[0])


def search_cell(
    spec: SweepSpec, label: str, batch: int, obtain: Callable[[Trial], TrialResult | None]
) -> tuple[list[TrialResult], bool]:
    """The learning-rate search of one cell on the first seed, in run order.

    Every candidate, then (``extend_search`` times at most) one rate past the edge while the best
    is the smallest or largest rate tried. ``obtain`` runs or looks up a trial; None means it has
    not run yet, which ends the search as incomplete. Returns (results, complete). The runner and
    the report both replay the search through this one function, so they agree on its trials.
    """
    seed = spec.seeds[0]
    tried = list(spec.optimizer(label).lrs[batch])
    results: list[TrialResult] = []
    for lr in tried:
        result = obtain(Trial(label, batch, lr, seed))
        if result is None:
            return results, False
        results.append(result)
    for _ in range(spec.extend_search):
        best = select_best(results)
        nxt = None if best is None else rate_beyond_edge(tried, best.lr)
        if nxt is None or nxt in tried:
            break
        tried.append(nxt)
        result = obtain(Trial(label, batch, nxt, seed))
        if result is None:
            return results, False
        results.append(result)
    return results, True


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    trial_fn: TrialFn = run_trial,
    log: Callable[[str], None] = print,
    on_cell: Callable[[list[TrialResult]], None] | None = None,
) -> list[TrialResult]:
    """Run (or resume) every cell, batch by batch; return all trial results in run order.

    ``on_cell`` is called with the results so far after each cell (the command writes the
    report there, so a stopped sweep still leaves one).
    """
    out = Path(out)
    num_train_examples(spec)
    results: list[TrialResult] = []
    done = ran = 0

    def obtain(trial: Trial) -> TrialResult:
        nonlocal done, ran
        run_dir = out / "cells" / trial.name
        config = spec.trial_config(trial, run_dir)
        stored = _read_result(run_dir, config)
        if stored is not None:
            done += 1
            results.append(stored)
            return stored
        resume = "auto" if (run_dir / "config.yaml").exists() else None
        if resume:
            _check_cell_config(run_dir, config)
        total = f"{spec.total_trials()}{'+' if spec.extend_search else ''}"
        log(f"[{done + ran + 1}/{total}] {trial.name}" + (" (resuming)" if resume else ""))
        try:
            result = trial_fn(trial, config, resume)
        except RunDirError as err:  # advice for train (--overwrite); a sweep's cell is deleted to rerun
            if "--overwrite" not in str(err):
                raise
            problem = str(err).split("; ")[0]
            raise ConfigError(f"sweep cell {run_dir}: {problem}; {RERUN_CELL}") from None
        _write_result(run_dir, result, config)
        ran += 1
        score = f"top-1 {result.top1:.2f}%" if result.top1 is not None else f"DIVERGED at step {result.steps}"
        log(f"    {score}, {result.steps} steps, {result.wall_s:.1f} s")
        results.append(result)
        return result

    for batch in spec.batch_sizes:
        for opt in spec.optimizers:
            search, _ = search_cell(spec, opt.label, batch, obtain)
            best = select_best(search)
            if best is None:
                log(f"    {opt.label} at batch {batch}: every candidate diverged; no further seeds")
            else:
                if len(search) > 1:
                    log(f"    {opt.label} at batch {batch}: best lr {format_lr(best.lr)} "
                        f"(top-1 {best.top1:.2f}% on seed {best.seed})")
                for seed in spec.seeds[1:]:
                    obtain(Trial(opt.label, batch, best.lr, seed))
            if on_cell is not None:
                on_cell(list(results))
    log(f"{ran} trial(s) run, {done} already done")
    return results

