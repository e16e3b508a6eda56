"""Issue 22, "Second contact": lost work, silent wrong results and tracebacks a new user met."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support.runs import QUICK, synthetic_args

from largebatch.cli import main
from largebatch.config import ConfigError, load_config, parse_override
from largebatch.schedule import WarmupDecay


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


# ---- loses work ---------------------------------------------------------------------------------

def test_demo_refuses_a_directory_holding_another_run_and_keeps_it(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 3\n")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    assert main(["demo", "--out", str(run), "--epochs", "1", "--no-progress"]) == 2
    assert last_error(capsys) == (f"largebatch: error: run directory {run} already holds a run; pass --resume auto "
                                  "to continue it or --overwrite to replace it")
    assert (run / "config.yaml").read_text() == "epochs: 3\n"
    assert (run / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'


def test_no_evaluation_examples_is_refused_before_training(tmp_path, capsys):
    assert main(["train", *synthetic_args(tmp_path, num_eval=0)]) == 2
    assert last_error(capsys) == ("largebatch: error: the synthetic data has no evaluation examples (num_eval=0); "
                                  "set eval_every=0 to train without evaluation")
    assert not (tmp_path / "run").exists()
    assert main(["train", *synthetic_args(tmp_path, num_eval=0), "--set", "eval_every=0"]) == 0


def test_a_diverging_eval_loss_stops_the_run_like_a_diverging_training_loss(tmp_path, capsys):
    # LAMB at LARS's rate of 10: the training loss stays finite while the eval loss reaches ~1e18
    args = synthetic_args(tmp_path, "--optimizer", "lamb", "--lr", "10", "--epochs", "2",
                          num_train=256, num_eval=64, pool_size=256)
    code = main(["train", *args])
    line = last_error(capsys)
    assert code == 3, line
    assert line.startswith("largebatch: error: eval loss ") and "diverged" in line and "lower optim.lr" in line
    loss = float(line.split("eval loss ")[1].split()[0])
    assert not math.isfinite(loss) or loss > 100 * math.log(3)  # 100 x a uniform guess's loss
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()


# ---- silent wrong results -----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "value"), [("1e-3", 1e-3), ("5e-4", 5e-4), ("1e-8", 1e-8), ("6.4e1", 64.0),
                                             ("1E2", 100.0), ("-2e+1", -20.0)])
def test_every_python_float_spelling_is_a_number_in_yaml_and_set(tmp_path, text, value):
    assert parse_override(f"optim.weight_decay={text}")[1] == value
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"optim:\n  name: lamb\n  lr: {abs(value)}\n  weight_decay: {text.lstrip('-')}\n")
    config = load_config(config_file)
    assert config.optim.weight_decay == abs(value)
    assert load_config(None, [parse_override(f"optim.lr={text.lstrip('-')}")]).optim.lr == abs(value)


def test_strings_that_only_look_like_numbers_stay_strings():
    assert parse_override("out=e5")[1] == "e5"
    assert parse_override("out=1e")[1] == "1e"
    assert parse_override("epochs=12")[1] == 12 and isinstance(parse_override("epochs=12")[1], int)


@pytest.mark.parametrize(("pairs", "message"), [
    ([("optim.lr", 1.0), ("schedule.end_lr", 2.0)], "schedule.end_lr 2 is above the peak optim.lr 1"),
    ([("optim.lr", 1.0), ("schedule.warmup_epochs", 1.0), ("schedule.warmup_start_lr", 3.0)],
     "schedule.warmup_start_lr 3 is above the peak optim.lr 1"),
    ([("optim.lr", 0.1), ("schedule.scaling", "linear"), ("batch_size", 512), ("schedule.end_lr", 0.5)],
     "schedule.end_lr 0.5 is above the peak optim.lr (after linear scaling) 0.2"),
    ([("schedule.decay", "step"), ("schedule.gamma", 2.0), ("schedule.milestones", [1])],
     "schedule.gamma 2 is above 1"),
])
def test_schedules_that_run_backwards_are_refused(pairs, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, pairs)
    assert str(err.value).startswith(message)


def test_a_schedule_within_its_peak_is_accepted():
    config = load_config(None, [("optim.lr", 0.1), ("schedule.scaling", "linear"), ("batch_size", 512),
                                ("schedule.end_lr", 0.15)])  # 0.15 < the scaled peak 0.2
    assert config.schedule.end_lr == 0.15


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(end_lr=2.0), "end_lr 2 is above the peak base_lr 1"),
    (dict(warmup_steps=5, warmup_start_lr=2.0), "warmup_start_lr 2 is above the peak base_lr 1"),
    (dict(decay="step", milestones=(60, 30)), r"milestones must be increasing, got \[60, 30\]"),
    (dict(decay="step", milestones=(30, 30)), "milestones must be increasing"),
    (dict(decay="step", gamma=1.5), "gamma 1.5 is above 1"),
])
def test_warmup_decay_refuses_backwards_schedules_and_unsorted_milestones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupDecay(base_lr=1.0, total_steps=100, **kwargs)


def test_warmup_decay_still_takes_an_unused_setting_above_the_peak():
    # end_lr means nothing to a step decay, warmup_start_lr nothing without a warm-up
    assert WarmupDecay(base_lr=1.0, total_steps=10, decay="step", end_lr=5.0)(0) == 1.0
    assert WarmupDecay(base_lr=1.0, total_steps=10, warmup_start_lr=5.0)(0) == 1.0


# ---- option ranges --------------------------------------------------------------------------------

@pytest.mark.parametrize(("pairs", "message"), [
    ([("out", "")], "out must name a run directory, got ''"),
    ([("out", "  ")], "out must name a run directory, got ''"),
    ([("threads", 1000)], "threads 1000 exceeds the "),
    ([("seed", 99999999999999999999)], "seed must be in [0, 2**32), got 99999999999999999999"),
    ([("seed", -1)], "seed must be in [0, 2**32), got -1"),
    ([("data.name", "synthetic"), ("data.root", "/data")], "data.root (/data) is not read by synthetic data"),
])
def test_option_ranges_are_refused_in_one_line(pairs, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, pairs)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_home_is_expanded_in_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, [("out", "~/runs/a"), ("data.root", "~/data")])
    assert (config.out, config.data.root) == (str(tmp_path / "runs/a"), str(tmp_path / "data"))


def test_one_class_is_refused_before_training(tmp_path, capsys):
    assert main(["train", *synthetic_args(tmp_path, num_classes=1)]) == 2
    assert last_error(capsys) == "largebatch: error: the synthetic data has 1 class(es); a classifier needs at least 2"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "compute", "mlp", "--threads", "0"], "argument --threads: must be > 0, got 0"),
    (["bench", "compute", "mlp", "--steps", "0"], "argument --steps: must be > 0, got 0"),
    (["bench", "comm", "--reps", "0"], "argument --reps: must be > 0, got 0"),
    (["bench", "comm", "--processes", "-2"], "argument --processes: must be > 0, got -2"),
    (["sweep", "--spec", "x.yaml", "--out", "o", "--dry-run", "--img-per-s", "-5"],
     "argument --img-per-s: must be > 0, got -5"),
    (["sweep", "--spec", "x.yaml", "--out", "o", "--dry-run", "--img-per-s", "nan"],
     "argument --img-per-s: must be > 0, got nan"),
])
def test_command_counts_and_rates_must_be_positive(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert last_error(capsys).endswith(message)


# ---- tracebacks where a line belongs -----------------------------------------------------------

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.mark.parametrize("argv", [["plan", "--list-hardware"],
                                  ["sweep", "--spec", "configs/sweep_fmnist.yaml", "--out", "unused", "--dry-run"]])
def test_a_closed_standard_output_ends_quietly(argv):
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head -1`) has gone before the first line
    proc = subprocess.run([sys.executable, "-m", "largebatch", *argv], stdout=write_end, stderr=subprocess.PIPE,
                          env=dict(os.environ, PYTHONPATH=SRC), timeout=120, text=True, cwd=Path(SRC).parent)
    os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 0


def test_python_m_largebatch_runs_the_command_line():
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "largebatch", "--version"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=SRC), timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("largebatch ")


@pytest.mark.parametrize("value", [0, -1, 1.5])
def test_prefetch_factor_below_one_is_refused_naming_it(tmp_path, value):
    from largebatch.data.base import DataError
    from largebatch.data.imagefolder import imagefolder

    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match=rf"^prefetch_factor must be a positive integer .*got {value}$"):
        imagefolder(tmp_path, "cpu", 0, prefetch_factor=value)


# ---- the planner --------------------------------------------------------------------------------

def test_planner_counts_iterations_as_the_trainer_runs_them():
    from largebatch.plan.predict import iterations

    # the demo: 60,000 images, batch 8192, 40 epochs -> 7 full batches per epoch, 280 steps
    assert iterations(40, 60_000, 8192) == 40 * (60_000 // 8192) == 280
    assert iterations(40, 60_000, 8192, drop_last=False) == 293  # ceil(40 x 60000 / 8192), the paper's way


@pytest.mark.parametrize(("argv", "message"), [
    (["--processes", "3:9"], "--global-batch 32768 does not divide among 3, 9 processes"),
    (["--processes", "3"], "--global-batch 32768 does not divide among 3 processes"),
    (["--global-batch", "2000000", "--processes", "1:4"],
     "--global-batch 2000000 is larger than the data set (1281167 images, --dataset-size)"),
])
def test_planner_refuses_impossible_plans(capsys, argv, message):
    code = main(["plan", "--model", "resnet50", "--hardware", "stampede2-knl", "--profile-source", "paper", *argv])
    assert code == 2
    assert last_error(capsys).startswith(f"largebatch: error: {message}")


# ---- more tracebacks ----------------------------------------------------------------------------

def test_triton_path_where_it_cannot_run_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code = main(["train", *synthetic_args(tmp_path, "--set", "optim.implementation=triton", "--device", "cpu")])
    line = last_error(capsys)
    assert code == 2, line
    assert line.startswith("largebatch: error: optim.implementation=triton cannot run here (")
    assert line.endswith("set optim.implementation=auto")
    assert not (tmp_path / "run").exists()


def test_a_batch_that_does_not_fit_in_memory_suggests_micro_batch(tmp_path, capsys, monkeypatch):
    import largebatch.trainer as trainer

    def no_memory(self, micro_batches):
        # what the CPU allocator raises when the activations of the whole batch do not fit
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(trainer.Trainer, "train_step", no_memory)
    assert main(["train", *synthetic_args(tmp_path)]) == 2
    line = last_error(capsys)
    assert line.startswith("largebatch: error: out of memory (") and "pass a smaller --micro-batch" in line


def test_bench_comm_sizes_in_the_wrong_order_are_one_line(capsys):
    assert main(["bench", "comm", "--min-size", "1G", "--max-size", "1K"]) == 2
    assert last_error(capsys) == "largebatch: error: --min-size 1G is larger than --max-size 1K"


@pytest.mark.parametrize("kind", ["dir", "bad", "list", "no-parent"])
def test_bench_yaml_is_checked_before_measuring(tmp_path, capsys, kind):
    target = {"dir": tmp_path, "bad": tmp_path / "bad.yaml", "list": tmp_path / "list.yaml",
              "no-parent": tmp_path / "missing" / "hw.yaml"}[kind]
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["bench", "compute", "mlp", "--batch", "4", "--steps", "1", "--yaml", str(target)]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing was measured
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"largebatch: error: --yaml {target}")
    assert (tmp_path / "bad.yaml").read_text() == "name: [unclosed\n"


# ---- messages and small things --------------------------------------------------------------------

def test_header_names_the_autocast_as_precision_does(tmp_path, capsys):
    assert main(["train", *synthetic_args(tmp_path, "--precision", "bf16")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "autocast bf16," in header and "torch." not in header


def test_planner_without_a_compute_rate_says_how_to_get_one(capsys):
    code = main(["plan", "--model", "resnet50", "--hardware", "stampede2-knl", "--profile-source", "paper",
                 "--processes", "4"])
    assert code == 0  # this shipped file has FLOP/s; a file without either is checked below
    from dataclasses import replace

    from largebatch.plan.errors import PlanError
    from largebatch.plan.hardware import load_hardware
    from largebatch.plan.model import resolve_profile
    from largebatch.plan.predict import predict_iteration

    hw = replace(load_hardware("stampede2-knl"), flops=None, images_per_s={})
    with pytest.raises(PlanError, match=r"give --images-per-s, or measure it: largebatch bench compute resnet50"):
        predict_iteration(resolve_profile("resnet50", "paper"), hw, 4, 256)


def test_planner_names_the_flag_of_a_negative_parameter_count(capsys):
    code = main(["plan", "--model", "x", "--hardware", "stampede2-knl", "--params", "-5", "--processes", "4"])
    assert code == 2
    assert last_error(capsys) == "largebatch: error: --params must be > 0, got -5"


def test_sweep_description_says_one_epoch():
    from largebatch.study.grid import load_spec, parse_spec_override
    from largebatch.study.report import describe

    overrides = [parse_spec_override("epochs=1"), parse_spec_override("schedule.warmup_epochs=0.5")]
    spec = load_spec("configs/sweep_fmnist.yaml", overrides)
    assert describe(spec).endswith(", 1 epoch")


def test_package_metadata_builds_without_a_license_deprecation(tmp_path):
    import shutil
    import subprocess
    import sys

    root = Path(SRC).parent
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    (tmp_path / "src" / "largebatch").mkdir(parents=True)
    (tmp_path / "src" / "largebatch" / "__init__.py").write_text("")
    code = ("import tempfile; from setuptools import build_meta; "
            "print(build_meta.prepare_metadata_for_build_wheel(tempfile.mkdtemp()))")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "largebatch-" in proc.stdout
    assert "deprecat" not in (proc.stdout + proc.stderr).lower()


def test_a_divergence_before_any_checkpoint_says_so_and_counts_steps_as_metrics_do(tmp_path, capsys):
    args = synthetic_args(tmp_path, "--optimizer", "sgd", "--lr", "1e6", "--set", "optim.momentum=0",
                          "--set", "log_every=1", num_train=256, pool_size=256)
    assert main(["train", *args]) == 3
    line = last_error(capsys)
    assert line.startswith("largebatch: error: non-finite loss or gradient at step ")
    assert line.endswith("stopped, no checkpoint had been written yet")
    step = int(line.split("at step ")[1].split()[0])
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    finite = [r["step"] for r in rows if r["kind"] == "train" and math.isfinite(r["loss"])]
    assert step >= 1 and all(s < step for s in finite)  # every logged step before it had a finite loss


def test_an_empty_val_folder_is_one_line(tmp_path):
    from PIL import Image

    from largebatch.data.base import DataError
    from largebatch.data.imagefolder import imagefolder

    for cls in ("cat", "dog"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / cls / "0.jpg")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match=rf"^imagefolder: no class folders in {tmp_path / 'val'}$"):
        imagefolder(tmp_path, "cpu", 0, workers=0)


def test_imagefolder_checkpoints_carry_the_class_names_for_inference(tmp_path, capsys):
    import torch
    from PIL import Image

    from largebatch.checkpoint import load_checkpoint
    from largebatch.models import build_model

    images = tmp_path / "images"
    for split in ("train", "val"):
        for i, cls in enumerate(("cat", "dog")):
            (images / split / cls).mkdir(parents=True)
            for j in range(4):
                Image.new("RGB", (20, 20), (200 * i, 40 * j, 90)).save(images / split / cls / f"{j}.jpg")
    out = tmp_path / "run"
    args = ["--data", "imagefolder", "--data-dir", str(images), "--set", "data.options.image_size=16",
            "--set", "data.options.workers=0", "--batch-size", "4", "--epochs", "1", "--out", str(out), *QUICK]
    assert main(["train", *args]) == 0, capsys.readouterr().err
    payload = load_checkpoint(out / "checkpoints" / "best.pt")
    assert payload["classes"] == ["cat", "dog"]
    # inference as docs/models_and_data.md describes it: the config rebuilds the model, the weights load
    cfg = payload["config"]
    model = build_model(cfg["model"]["name"], num_classes=len(payload["classes"]), in_channels=3, image_size=16,
                        **cfg["model"]["options"])
    model.load_state_dict(payload["model"])
    assert model(torch.zeros(1, 3 * 16 * 16).view(1, 3, 16, 16)).shape == (1, 2)


def test_progress_rate_is_smoothed_and_follows_a_steady_change():
    import io

    from largebatch.metrics import Progress

    stream = io.StringIO()
    progress = Progress(1000, enabled=True, stream=stream, lines=1000)
    rates = [907.0, 20000.0] * 20  # what one log interval at a time reported
    for step, rate in enumerate(rates, start=1):
        progress.update(step, 0, 0.1, 1.0, rate)
    shown = [float(line.split(" img/s")[0].split()[-1].replace(",", "")) for line in stream.getvalue().splitlines()]
    assert len(shown) == len(rates)
    later = shown[10:]  # after the average has filled
    assert max(later) - min(later) < 0.3 * (20000 - 907)  # raw values swing by the whole range
    mean = sum(rates) / len(rates)
    assert all(abs(v - mean) < 0.2 * mean for v in shown[20:])
    for step in range(41, 101):  # a steady new rate is reached
        progress.update(step, 0, 0.1, 1.0, 5000.0)
    assert abs(float(stream.getvalue().splitlines()[-1].split(" img/s")[0].split()[-1].replace(",", "")) - 5000) < 50


def test_no_accuracy_plot_without_evaluation(tmp_path):
    assert main(["train", *synthetic_args(tmp_path, "--set", "eval_every=0")]) == 0
    plots = sorted(p.name for p in (tmp_path / "run" / "plots").iterdir())
    assert plots == ["loss.png", "lr.png"]


def test_options_mapping_replaces_and_dotted_keys_merge_as_keys_says(tmp_path, capsys):
    from largebatch.config import describe_keys

    config_file = tmp_path / "c.yaml"
    config_file.write_text("data:\n  options: {workers: 2, image_size: 64}\n")
    whole = load_config(config_file, [parse_override("data.options={workers: 4}")])
    assert whole.data.options == {"workers": 4}
    dotted = load_config(config_file, [parse_override("data.options.workers=4")])
    assert dotted.data.options == {"workers": 4, "image_size": 64}
    about = dict((k, a) for k, _, a in describe_keys())
    for key in ("data.options", "model.options"):
        assert "replaces the whole mapping" in about[key] and "keeps the others" in about[key]


def test_bench_yaml_update_keeps_the_files_comments(tmp_path, capsys):
    from largebatch.yaml_numbers import load_yaml

    target = tmp_path / "hw.yaml"
    target.write_text("# measured on box A, load 0.1\n# second line of provenance\nname: box\n"
                      "compute:\n  images_per_s:\n    # from an earlier run\n    alexnet: 22.03\n")
    assert main(["bench", "compute", "mlp", "--batch", "4", "--steps", "1", "--warmup", "0", "--threads", "1",
                 "--yaml", str(target)]) == 0
    text = target.read_text()
    assert text.startswith("# measured on box A, load 0.1\n# second line of provenance\n")
    assert "# from an earlier run" in text
    data = load_yaml(text)
    assert data["compute"]["images_per_s"]["alexnet"] == 22.03 and data["compute"]["images_per_s"]["mlp"] > 0


def test_a_full_disk_at_the_first_checkpoint_does_not_promise_earlier_ones(tmp_path, monkeypatch):
    import errno

    import torch

    import largebatch.checkpoint as ckpt

    def full(path, data, before_commit=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    first = tmp_path / "checkpoints" / "best.pt"
    real = ckpt._atomic_write
    monkeypatch.setattr(ckpt, "_atomic_write", full)
    with pytest.raises(ckpt.CheckpointError, match=r"No space left on device; no earlier checkpoint exists$"):
        ckpt.save_checkpoint(first, {"w": torch.zeros(1)})
    monkeypatch.setattr(ckpt, "_atomic_write", real)
    ckpt.save_checkpoint(tmp_path / "checkpoints" / "step_1.pt", {"w": torch.zeros(1)})
    monkeypatch.setattr(ckpt, "_atomic_write", full)
    with pytest.raises(ckpt.CheckpointError, match=r"No space left on device; earlier checkpoints are kept$"):
        ckpt.save_checkpoint(first, {"w": torch.zeros(1)})


def test_demo_help_names_the_model_it_trains_and_how_to_shorten_it(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ResNet" not in text
    assert "fmnist_net" in text and "--epochs N shortens it" in text and "--overwrite" in text


def test_a_checkpoint_copied_without_its_sha256_gets_a_hint(tmp_path):
    import torch

    import largebatch.checkpoint as ckpt

    source = ckpt.save_checkpoint(tmp_path / "a" / "step_1.pt", {"w": torch.zeros(1)})
    (tmp_path / "b").mkdir()
    copy = tmp_path / "b" / "step_1.pt"
    copy.write_bytes(source.read_bytes())
    with pytest.raises(ckpt.CheckpointError, match=r"copy both files\)$"):
        ckpt.load_checkpoint(copy)
    (tmp_path / "b" / "step_1.pt.sha256").write_bytes((tmp_path / "a" / "step_1.pt.sha256").read_bytes())
    assert torch.equal(ckpt.load_checkpoint(copy)["w"], torch.zeros(1))
