"""`largebatch sweep`: a miniature sweep's table, CSV and plot; resume after a stop; divergence as
data; spec validation. Tiny synthetic data and an MLP, so the whole file runs in seconds."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from largebatch.cli import main
from largebatch.config import ConfigError
from largebatch.study import grid, runner
from largebatch.study.grid import Trial, build_spec, load_spec, parse_spec_override, rate_beyond_edge
from largebatch.study.report import SUMMARY_COLUMNS, write_report
from largebatch.study.runner import TrialResult, run_sweep, run_trial
from largebatch.trainer import Preempted, Trainer

NUM_TRAIN = 512
EPOCHS = 2
SPEC = {
    "base": {
        "model": {"name": "mlp", "options": {"hidden": 16}},
        "data": {
            "name": "synthetic", "augment": False,
            "options": {"shape": [1, 8, 8], "num_classes": 4, "num_train": NUM_TRAIN, "num_eval": 128,
                        "pool_size": 512},
        },
        "epochs": EPOCHS,
        "precision": "fp32",
        "threads": 1,
        "schedule.warmup_epochs": 1,
    },
    "batch_sizes": [64, 128],
    "max_micro_batch": 64,  # batch 128 accumulates two micro-batches
    "seeds": [0, 1],
    "optimizers": {
        "lars": {"lrs": [1.0, 4.0], "set": {"optim.trust_coefficient": 0.01}},  # LARS-only: refused for sgd
        # 1e30 diverges within a few steps: the sweep must record it and go on
        "sgd": {"lrs": [0.05, 1e30], "set": {"schedule.scaling": "linear", "schedule.warmup_start_lr": 0.0}},
    },
}


def quiet(_: str) -> None:
    pass


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def last_eval_top1(run_dir: Path) -> float | None:
    """The final top-1 as the trainer logged it, read independently of result.json."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    return evals[-1]["top1"] if evals else None


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, grid.SweepSpec]:
    """One uninterrupted miniature sweep, run through the command line."""
    root = tmp_path_factory.mktemp("sweep")
    spec_file = root / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    assert main(["sweep", "--spec", str(spec_file), "--out", str(root / "out")]) == 0
    return root / "out", load_spec(spec_file)


def test_miniature_sweep_writes_table_csv_and_plot(finished):
    out, spec = finished
    rows = read_csv(out / "summary.csv")
    assert tuple(rows[0]) == SUMMARY_COLUMNS
    assert [(int(r["batch"]), r["optimizer"]) for r in rows] == [(b, o) for b in (64, 128) for o in ("lars", "sgd")]
    cells = out / "cells"
    for row in rows:
        batch, label = int(row["batch"]), row["optimizer"]
        assert int(row["iters_per_epoch"]) == NUM_TRAIN // batch
        assert int(row["steps"]) == EPOCHS * (NUM_TRAIN // batch)
        assert int(row["lr_trials"]) == 2 and int(row["seeds"]) == 2 and row["status"] == "ok"
        # the lr search: the best seed-0 run by the trainer's own final evaluation
        candidates = SPEC["optimizers"][label]["lrs"]
        search = {lr: last_eval_top1(cells / Trial(label, batch, lr, 0).name) for lr in candidates}
        finite = {lr: top1 for lr, top1 in search.items() if top1 is not None}
        best = max(finite, key=lambda lr: (finite[lr], -lr))
        assert float(row["best_lr"]) == best
        top1s = [last_eval_top1(cells / Trial(label, batch, best, s).name) for s in (0, 1)]
        assert float(row["top1_mean"]) == pytest.approx(statistics.fmean(top1s), abs=1e-4)
        assert float(row["top1_std"]) == pytest.approx(statistics.stdev(top1s), abs=1e-4)
        assert (float(row["top1_min"]), float(row["top1_max"])) == pytest.approx((min(top1s), max(top1s)), abs=1e-4)
        # each trial is a normal run directory, with accumulation above max_micro_batch
        config = yaml.safe_load((cells / Trial(label, batch, best, 1).name / "config.yaml").read_text())
        assert (config["batch_size"], config["micro_batch"], config["seed"]) == (batch, 64, 1)
        assert (cells / Trial(label, batch, best, 1).name / "checkpoints").is_dir()
    # what the larger batch costs: each optimizer against itself at the smallest batch
    for label in ("lars", "sgd"):
        small, large = (next(r for r in rows if r["optimizer"] == label and int(r["batch"]) == b) for b in (64, 128))
        assert float(small["top1_vs_smallest"]) == 0.0
        expected = float(large["top1_mean"]) - float(small["top1_mean"])
        assert float(large["top1_vs_smallest"]) == pytest.approx(expected, abs=1e-4)
    sgd_rows = [r for r in rows if r["optimizer"] == "sgd"]
    assert all(int(r["lr_trials_diverged"]) == 1 and float(r["best_lr"]) == 0.05 for r in sgd_rows)
    # linear scaling of the baseline's rate from batch 256
    assert [float(r["peak_lr"]) for r in sgd_rows] == pytest.approx([0.05 * 64 / 256, 0.05 * 128 / 256])

    trials = read_csv(out / "trials.csv")
    assert len(trials) == spec.total_trials() == 2 * 2 * (2 + 1)
    assert len(list(cells.iterdir())) == len(trials)

    md = (out / "summary.md").read_text()
    assert "| batch | iters/epoch | optimizer | best lr |" in md and "| vs 64 |" in md
    for row in rows:
        assert f"| {row['batch']} | {row['iters_per_epoch']} | {row['optimizer']} |" in md
    assert "Diverged: sgd_b64_lr1e+30_s0" in md and "Trials per cell: lars 3" in md

    png = (out / "top1_vs_batch.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_diverged_trial_is_recorded_not_fatal(finished):
    out, _ = finished
    result = json.loads((out / "cells" / "sgd_b128_lr1e+30_s0" / "result.json").read_text())
    assert result["status"] == "diverged" and result["top1"] is None
    assert 0 < result["steps"] < result["total_steps"] and "non-finite" in result["message"]
    # no further seed at a diverged rate
    assert not (out / "cells" / "sgd_b128_lr1e+30_s1").exists()


def test_rerun_of_a_finished_sweep_trains_nothing(finished, tmp_path, monkeypatch):
    out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    before = (copy / "summary.csv").read_text()

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr(runner, "Trainer", NoTraining)
    spec_file = out.parent / "spec.yaml"
    assert main(["sweep", "--spec", str(spec_file), "--out", str(copy)]) == 0
    assert (copy / "summary.csv").read_text() == before


def test_stopped_sweep_resumes_the_partial_trial_and_skips_finished_ones(finished, tmp_path):
    out, spec = finished
    target = "sgd_b64_lr0.05_s0"  # stopped after its first step, as SIGTERM would
    calls: list[tuple[str, str | None]] = []

    def stop_in_target(trial, config, resume):
        calls.append((trial.name, resume))
        if trial.name == target:
            trainer = Trainer(config, resume=resume)
            trainer._stop_requested = True
            trainer.run()  # writes a checkpoint at step 1, then raises Preempted
        return run_trial(trial, config, resume)

    with pytest.raises(Preempted):
        run_sweep(spec, tmp_path / "out", trial_fn=stop_in_target, log=quiet)
    first = [name for name, _ in calls]
    assert first[-1] == target and not (tmp_path / "out" / "cells" / target / "result.json").exists()

    calls.clear()

    def counting(trial, config, resume):
        calls.append((trial.name, resume))
        return run_trial(trial, config, resume)

    results = run_sweep(spec, tmp_path / "out", trial_fn=counting, log=quiet)
    assert calls[0] == (target, "auto")  # continued from its checkpoint
    assert all(resume is None for _, resume in calls[1:])
    assert len(calls) == spec.total_trials() - (len(first) - 1)  # finished trials not recomputed
    assert {name for name, _ in calls}.isdisjoint(first[:-1])
    # the interrupted sweep ends where the uninterrupted one did (resume is exact)
    reference = {r["trial_name"]: r for r in _trial_rows(out)}
    for r in results:
        assert r.top1 == reference[r.trial.name]["top1"], r.trial.name
        assert r.steps == reference[r.trial.name]["steps"]
    resumed = [r for r in results if r.resumed]
    assert [r.trial.name for r in resumed] == [target]
    write_report(tmp_path / "out", spec, results)
    assert "resumed after a stop" in (tmp_path / "out" / "summary.md").read_text()


def test_trial_stopped_after_its_last_checkpoint_is_evaluated_not_retrained(finished, tmp_path, capsys):
    """Stopped between the trainer's end and result.json: resume finds nothing left to train (and the
    sweep, which finishes the trial itself, is not told to start a new run with more epochs)."""
    out, spec = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    name = "lars_b128_lr4_s1"
    original = json.loads((copy / "cells" / name / "result.json").read_text())
    (copy / "cells" / name / "result.json").unlink()
    calls = []

    def counting(trial, config, resume):
        calls.append((trial.name, resume))
        return run_trial(trial, config, resume)

    results = run_sweep(spec, copy, trial_fn=counting, log=quiet)
    assert calls == [(name, "auto")]
    (again,) = [r for r in results if r.trial.name == name]
    assert again.status == "ok" and again.steps == original["steps"] == original["total_steps"]
    assert again.top1 == original["top1"] is not None
    assert "already finished" not in capsys.readouterr().out


def _trial_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted((out / "cells").glob("*/result.json")):
        data = json.loads(path.read_text())
        data["trial_name"] = path.parent.name
        rows.append(data)
    return rows


def test_a_cell_where_every_rate_diverges(tmp_path):
    tree = dict(SPEC, batch_sizes=[128], optimizers={"sgd": {"lrs": [1e30]}})
    spec = build_spec(tree)
    results = run_sweep(spec, tmp_path, log=quiet)
    assert [r.status for r in results] == ["diverged"]  # seed 1 is not run at a diverged rate
    paths = write_report(tmp_path, spec, results)
    (row,) = read_csv(paths["csv"])
    assert row["status"] == "diverged" and row["top1_mean"] == "" and row["best_lr"] == ""
    assert "**diverged**" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 0


# ---- searching past the edge of the candidates ---------------------------------------------


def scored_trial(peak_lr: float):
    """A stand-in for the trainer whose top-1 peaks at ``peak_lr`` (log scale); records its calls."""
    calls: list[str] = []

    def trial_fn(trial: Trial, config, resume) -> TrialResult:
        calls.append(trial.name)
        Path(config.out).mkdir(parents=True, exist_ok=True)
        top1 = 90.0 - abs(math.log2(trial.lr / peak_lr)) - 0.01 * trial.seed
        return TrialResult(trial.label, "lars", trial.batch, trial.lr, trial.lr, trial.seed, "ok", top1, 99.0,
                           10, 10, 5, 2, trial.batch, 1, NUM_TRAIN, 4, 1.0)

    return trial_fn, calls


def test_rate_beyond_edge_follows_the_outermost_ratio():
    assert rate_beyond_edge([2.5, 5, 10], 10) == 20
    assert rate_beyond_edge([0.05, 0.1, 0.2], 0.05) == 0.025
    assert rate_beyond_edge([1, 3], 3) == 9 and rate_beyond_edge([1, 3], 1) == 0.3333
    assert rate_beyond_edge([2.5, 5, 10], 5) is None  # inside
    assert rate_beyond_edge([4], 4) is None  # one rate: no ratio to follow


@pytest.mark.parametrize(("candidates", "extend", "expected_rates", "best", "at_edge"), [
    ([1, 2], 0, [1, 2], 2, True),  # no extension: the edge is marked
    ([1, 2], 2, [1, 2, 4, 8], 8, True),  # stopped by the limit, still at the edge
    ([1, 2], 5, [1, 2, 4, 8, 16], 8, False),  # walks up until the optimum is inside
    ([32, 64], 5, [32, 64, 16, 8, 4], 8, False),  # and down
    ([4, 8, 16], 5, [4, 8, 16], 8, False),  # inside from the start: nothing added
])
def test_search_steps_past_the_edge(tmp_path, candidates, extend, expected_rates, best, at_edge):
    tree = dict(SPEC, batch_sizes=[64], seeds=[0, 1], extend_search=extend,
                optimizers={"lars": {"lrs": candidates}})
    spec = build_spec(tree)
    trial_fn, calls = scored_trial(peak_lr=8.0)
    results = run_sweep(spec, tmp_path, trial_fn=trial_fn, log=quiet)
    assert calls == [Trial("lars", 64, lr, 0).name for lr in expected_rates] + [Trial("lars", 64, best, 1).name]
    (row,) = read_csv(write_report(tmp_path, spec, results)["csv"])
    assert float(row["best_lr"]) == best and int(row["lr_trials"]) == len(expected_rates)
    assert row["best_lr_at_edge"] == str(at_edge) and row["status"] == "ok"
    # a rerun replays the same search from the stored results and trains nothing
    calls.clear()
    assert [r.trial for r in run_sweep(spec, tmp_path, trial_fn=trial_fn, log=quiet)] == [r.trial for r in results]
    assert calls == []


def test_report_of_an_extension_in_progress_is_incomplete(tmp_path):
    spec = build_spec(dict(SPEC, batch_sizes=[64], extend_search=3, optimizers={"lars": {"lrs": [1, 2]}}))
    trial_fn, _ = scored_trial(peak_lr=8.0)
    results = run_sweep(spec, tmp_path, trial_fn=trial_fn, log=quiet)
    first_extension = next(r for r in results if r.lr == 4)
    partial = results[: results.index(first_extension)]  # the candidates ran, the extension has not
    (row,) = read_csv(write_report(tmp_path, spec, partial)["csv"])
    assert row["status"] == "incomplete" and row["top1_mean"] == "" and int(row["lr_trials"]) == 2


# ---- the spec -------------------------------------------------------------------------------


def test_micro_batch_plan():
    spec = build_spec(dict(SPEC, max_micro_batch=48))
    assert spec.micro_batch(32) == 32  # fits: no accumulation
    assert spec.micro_batch(96) == 48
    assert spec.micro_batch(128) == 32  # 48 does not divide 128: the largest divisor below it
    assert build_spec(SPEC).micro_batch(128) == 64


def test_per_batch_candidates_and_trial_counts():
    tree = dict(SPEC, optimizers={"lars": {"lrs": {64: [1, 2, 3], 128: [2]}}})
    spec = build_spec(tree)
    assert spec.trials_per_cell("lars", 64) == 3 + 1 and spec.trials_per_cell("lars", 128) == 1 + 1
    assert spec.total_trials() == 6


@pytest.mark.parametrize(("change", "message"), [
    ({"batch_size": [64]}, "unknown config key 'batch_size' (did you mean 'batch_sizes'?)"),
    ({"base": {"batch_size": 64}}, "base.batch_size is set by the sweep"),
    ({"base": {"optim": {"lr": 1}}}, "base.optim.lr is set by the sweep"),
    ({"seeds": [0, 0]}, "seeds has repeated values"),
    ({"extend_search": -1}, "extend_search must be an integer >= 0"),
    ({"batch_sizes": []}, "batch_sizes must be a non-empty list"),
    ({"optimizers": {"adam": {"lrs": [1]}}}, "optimizers.adam.name must be one of lars, lamb, sgd"),
    ({"optimizers": {"lars": {"lrs": [1, -2]}}}, "optimizers.lars.lrs must hold finite numbers > 0"),
    ({"optimizers": {"lars": {"lrs": {64: [1]}}}}, "optimizers.lars.lrs gives no candidates for batch 128"),
    ({"optimizers": {"lars": {"lr": [1]}}}, "did you mean 'optimizers.lars.lrs'"),
    ({"optimizers": {"lars": {"lrs": [1], "set": {"optim.trust": 0.1}}}}, "unknown config key 'optim.trust'"),
    ({"base": {**SPEC["base"], "model": {"name": "vgg"}}}, "unknown model 'vgg'; choose one of: alexnet_bn"),
    ({"base": {**SPEC["base"], "model": {"name": "mlp", "options": {"hidden": -3}}}},
     "model.options.hidden must be an integer >= 1 for mlp, got -3"),
    ({"optimizers": {"lars": {"lrs": [1], "set": {"model.options.width": 8}}}},
     "model 'mlp' has no option 'width'"),
])
def test_bad_specs_are_refused_in_one_line(change, message):
    with pytest.raises(ConfigError) as info:
        build_spec({**SPEC, **change})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_overrides_address_the_spec_or_the_trainer(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    pairs = [parse_spec_override(t) for t in ("epochs=5", "batch_sizes=[128]", "optimizers.lars.lrs=[3]",
                                               "model.options.hidden=8")]
    spec = load_spec(path, pairs)
    config = spec.trial_config(Trial("lars", 128, 3.0, 0), tmp_path / "run")
    assert (config.epochs, config.batch_size, config.optim.lr, config.model.options["hidden"]) == (5, 128, 3.0, 8)
    assert spec.batch_sizes == [128]
    # per-optimizer settings stay with their optimizer
    assert spec.trial_config(Trial("sgd", 128, 0.05, 0), "x").schedule.scaling == "linear"
    assert spec.trial_config(Trial("lars", 128, 3.0, 0), "x").schedule.scaling == "none"


def test_batch_sizes_override_picks_a_subset_of_per_batch_rates(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(dict(SPEC, optimizers={"lars": {"lrs": {64: [1, 2], 128: [3]}}})))
    spec = load_spec(path, [parse_spec_override("batch_sizes=[128]")])
    assert spec.batch_sizes == [128] and spec.optimizer("lars").lrs == {128: (3.0,)}
    # a batch that is not in the file still needs its own candidates
    with pytest.raises(ConfigError, match="gives no candidates for batch 256"):
        load_spec(path, [parse_spec_override("batch_sizes=[128,256]")])
    # and in the file itself, candidates for a batch it does not sweep are still refused
    path.write_text(yaml.safe_dump(dict(SPEC, batch_sizes=[64], optimizers={"lars": {"lrs": {64: [1], 128: [3]}}})))
    with pytest.raises(ConfigError, match="has batch 128, which is not in batch_sizes"):
        load_spec(path)


def test_cli_errors_end_in_one_line(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(dict(SPEC, batch_sizes=[64, 1024])))
    assert main(["sweep", "--spec", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "largebatch: error: sweep spec: batch 1024 exceeds the training set (512 examples)"
    assert not (tmp_path / "out").exists()
    assert main(["sweep", "--spec", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "cannot read sweep spec" in capsys.readouterr().err


def test_dry_run_refuses_an_unknown_model_before_any_trial(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    args = ["sweep", "--spec", str(path), "--out", str(tmp_path / "out"), "--set", "model.name=vgg"]
    assert main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("largebatch: error: sweep spec, trial lars_b64_lr1_s0: unknown model 'vgg'")
    assert "\n" not in err
    assert main(args) == 2
    assert not (tmp_path / "out").exists()


def test_changed_spec_does_not_reuse_old_results(finished, tmp_path, capsys):
    out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    spec_file = out.parent / "spec.yaml"
    assert main(["sweep", "--spec", str(spec_file), "--out", str(copy), "--set", "epochs=3"]) == 2
    assert "holds a result for another config (it differs in epochs)" in capsys.readouterr().err


def test_dry_run_lists_the_work(finished, capsys):
    out, _ = finished
    spec_file = out.parent / "spec.yaml"
    assert main(["sweep", "--spec", str(spec_file), "--out", str(out), "--dry-run", "--img-per-s", "1000"]) == 0
    text = capsys.readouterr().out
    # batch 64: 3 trials x 2 epochs x 8 steps x 64; batch 128: 3 x 2 x 4 x 128; two optimizers each
    images = 2 * (3 * EPOCHS * (NUM_TRAIN // 64) * 64 + 3 * EPOCHS * (NUM_TRAIN // 128) * 128)
    assert f"12 trials, {images:,} training images" in text
    assert "64 x 2" in text  # batch 128 = micro 64 x 2 accumulation
