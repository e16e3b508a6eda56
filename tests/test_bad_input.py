"""Every mistake a user can make ends in one clear line on stderr and exit status 2, losing nothing."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import pytest
from support.images import jpeg_folder
from support.runs import QUICK, synthetic_args

from largebatch.cli import main
from largebatch.config import ConfigError, batch_plan, load_config

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(["train", *args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr' (did you mean 'optim.lr'?); allowed: model.name"),
        (["--set", "epochs=abc"], "epochs must be an integer, got 'abc'"),
        (["--set", "optim.nesterov=3"], "optim.nesterov must be true or false, got 3"),
        (["--lr", "0"], "optim.lr must be > 0, got 0.0"),
        (["--lr", "-0.5"], "optim.lr must be > 0, got -0.5"),
        (["--epochs", "0"], "epochs must be > 0, got 0"),
        (["--batch-size", "100", "--micro-batch", "30"],
         "batch_size 100 is not divisible by world size 1 x micro_batch 30 (= 30); "
         "choose a batch_size that is a multiple of 30"),
        (["--batch-size", "64", "--micro-batch", "128"], "micro_batch 128 is larger than the global batch_size 64"),
        (["--model", "vgg"], "unknown model 'vgg'; choose one of: alexnet_bn, alexnet, resnet50"),
        (["--optimizer", "adam"], "optim.name must be one of lars, lamb, sgd; got 'adam'"),
        (["--set", "precision=fp8"], "precision must be one of auto, fp32, bf16, fp16; got 'fp8'"),
        (["--set", "schedule.warmup_epochs=5"], "schedule.warmup_epochs 5.0 exceeds epochs 1"),
        (["--batch-size", "128"], "batch_size 128 exceeds the training set (64 examples)"),
        (["--workers", "2"], "dataset 'synthetic' has no option 'workers'; its options are: shape"),
        (["--set", "data.options.pad=-1"], "data.options.pad must be an integer >= 0, got -1"),
        (["--set", "data.options.shape=[a,b,c]"], "synthetic shape must be (C, H, W) of positive integers, got "),
    ],
)
def test_bad_settings_are_refused_with_one_line(tmp_path, capsys, args, message):
    code, line = run_cli(synthetic_args(tmp_path, *args), capsys)
    assert code == 2
    assert line.startswith(f"largebatch: error: {message}")
    assert not (tmp_path / "run").exists()  # nothing was created for a run that never started


def test_missing_config_file_and_bad_yaml(tmp_path, capsys):
    code, line = run_cli(["--config", str(tmp_path / "nope.yaml")], capsys)
    missing = tmp_path / "nope.yaml"
    assert code == 2 and line == f"largebatch: error: cannot read config file {missing}: No such file or directory"
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    code, line = run_cli(["--config", str(bad)], capsys)
    assert code == 2 and line.startswith(f"largebatch: error: config file {bad} is not valid YAML")
    bad.write_text("optim:\n  lr: fast\n")
    code, line = run_cli(["--config", str(bad)], capsys)
    assert code == 2 and line == "largebatch: error: optim.lr must be a number, got 'fast'"


def test_missing_dataset_directory(tmp_path, capsys):
    code, line = run_cli(["--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "run"), *QUICK], capsys)
    assert code == 2 and line == f"largebatch: error: Fashion-MNIST directory not found: {tmp_path / 'absent'}"


def _fmnist_copy(tmp_path: Path) -> Path:
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    target = tmp_path / "fmnist"
    shutil.copytree(FMNIST, target)
    return target


def test_wrong_magic_and_truncated_idx_files_name_the_file(tmp_path, capsys):
    root = _fmnist_copy(tmp_path)
    labels = root / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(labels.read_bytes())
    labels.write_bytes(gzip.compress(struct.pack(">I", 0x00000803) + raw[4:]))
    code, line = run_cli(["--data-dir", str(root), "--out", str(tmp_path / "run"), *QUICK], capsys)
    assert code == 2 and line == f"largebatch: error: {labels}: magic number 0x00000803, expected 0x00000801"
    labels.write_bytes(gzip.compress(raw[:6]))
    code, line = run_cli(["--data-dir", str(root), "--out", str(tmp_path / "run"), *QUICK], capsys)
    assert code == 2 and line == f"largebatch: error: {labels}: truncated header (6 bytes, need 8)"


def test_image_folder_without_classes_and_with_a_corrupt_jpeg(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    args = ["--data", "imagefolder", "--data-dir", str(empty), "--batch-size", "4", "--epochs", "1",
            "--set", "data.options={image_size: 16, workers: 0}", "--out", str(tmp_path / "run"), *QUICK]
    code, line = run_cli(args, capsys)
    assert code == 2 and line == f"largebatch: error: imagefolder: no class folders in {empty / 'train'}"
    images = tmp_path / "images"
    jpeg_folder(images, corrupt=True)
    args[3] = str(images)
    code, line = run_cli(args, capsys)
    assert code == 2
    assert line.startswith(f"largebatch: error: unreadable image {images / 'train' / 'dog' / '2.jpg'}")


def test_run_directory_holding_another_run_is_refused_and_kept(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("epochs: 3\n")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    code, line = run_cli(synthetic_args(tmp_path), capsys)
    assert code == 2
    assert line == (f"largebatch: error: run directory {run} already holds a run; pass --resume auto to "
                    "continue it or --overwrite to replace it")
    assert (run / "config.yaml").read_text() == "epochs: 3\n"
    assert (run / "metrics.jsonl").read_text() == '{"kind": "train", "step": 1}\n'


def test_resuming_with_a_different_config_is_refused(tmp_path, capsys):
    assert main(["train", *synthetic_args(tmp_path)]) == 0
    code, line = run_cli(synthetic_args(tmp_path, "--lr", "3", "--resume", "auto"), capsys)
    assert code == 2
    assert line == (f"largebatch: error: cannot resume {tmp_path / 'run'}: the config differs in optim.lr; "
                    "use a new --out or --overwrite")


def test_world_size_change_keeps_the_global_batch_or_refuses():
    config = load_config(None, [("batch_size", 32)])
    assert batch_plan(config, 4) == (8, 1)  # 32 = 4 x 8 x 1
    with pytest.raises(ConfigError, match=r"^batch_size 32 is not divisible by world size 3; choose a batch_size "
                       r"that is a multiple of 3 \(e.g. 30 or 33\)$"):
        batch_plan(config, 3)
    micro = load_config(None, [("batch_size", 32), ("micro_batch", 8)])
    assert batch_plan(micro, 1) == (8, 4) and batch_plan(micro, 2) == (8, 2)
    with pytest.raises(ConfigError, match=r"world size 3 x micro_batch 8 \(= 24\)"):
        batch_plan(micro, 3)


def rgb_args(tmp_path: Path, *extra: str) -> list[str]:
    """Tiny RGB synthetic data and a small CNN: the model options are what each test varies."""
    data = {"shape": [3, 8, 8], "num_classes": 3, "num_train": 64, "num_eval": 16, "pool_size": 64}
    return ["--data", "synthetic", "--set", f"data.options={json.dumps(data)}", "--batch-size", "32",
            "--epochs", "1", "--out", str(tmp_path / "run"), "--set", "threads=1", "--no-progress",
            "--model", "fmnist_net", *extra]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.options.width=-3"], "model.options.width must be an integer >= 1 for fmnist_net, got -3"),
        (["--set", "model.options.width=abc"],
         "model.options.width must be an integer >= 1 for fmnist_net, got 'abc'"),
        (["--set", "model.options.width=2.5"], "model.options.width must be an integer >= 1 for fmnist_net, got 2.5"),
        (["--set", "model.options.in_channels=1"],
         "model fmnist_net takes 1 input channels but the data's examples are 3 x 8 x 8 (3 channels); "
         "leave model.options.in_channels and image_size unset to follow the data"),
        (["--model", "alexnet_bn"], "model alexnet_bn cannot take 3 x 8 x 8 inputs: "),
        (["--model", "resnet_small", "--set", "model.options.blocks=0"],
         "model.options.blocks must be an integer >= 1 for resnet_small, got 0"),
        (["--model", "alexnet_bn", "--set", "model.options.groups=3"],
         "model.options.groups must be 1 or 2 for alexnet_bn, got 3"),
        (["--set", "model.options.depth=2"],
         "model 'fmnist_net' has no option 'depth'; its options are: in_channels, width"),
    ],
)
def test_bad_model_options_and_unfit_data_end_in_one_line(tmp_path, capsys, args, message):
    code, line = run_cli(rgb_args(tmp_path, *args), capsys)
    assert code == 2
    assert line.startswith(f"largebatch: error: {message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    for args in (["--set", "device=cuda"], ["--device", "cuda"]):
        code, line = run_cli(synthetic_args(tmp_path, *args), capsys)
        assert code == 2
        assert line == ("largebatch: error: device=cuda was asked for, but this machine has no CUDA device; "
                        "use --device cpu or --device auto")
        assert not (tmp_path / "run").exists()


def test_a_bug_keeps_its_traceback(monkeypatch):
    """A ValueError that is not a user error is a bug: no one-line disguise, no exit status 2."""
    import largebatch.trainer

    def broken(config, **kwargs):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(largebatch.trainer, "train", broken)
    with pytest.raises(ValueError, match="an internal mistake"):
        main(["train", "--no-progress"])


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([("schedule.power", 0)], "schedule.power must be > 0, got 0.0"),
        ([("schedule.gamma", -0.1)], "schedule.gamma must be > 0, got -0.1"),
        ([("schedule.milestones", [6, 3])], "schedule.milestones must be increasing, got [6.0, 3.0]"),
        ([("schedule.milestones", [0])], "schedule.milestones[0] must be an epoch in (0, epochs=10], got 0.0"),
        ([("schedule.milestones", [11])], "schedule.milestones[0] must be an epoch in (0, epochs=10], got 11.0"),
        ([("optim.betas", [0.9, 1.0])], "optim.betas[1] must be in [0, 1), got 1.0"),
        ([("optim.eps", -1e-8)], "optim.eps must be >= 0, got -1e-08"),
        ([("optim.nesterov", True), ("optim.momentum", 0)], "optim.nesterov=true needs optim.momentum > 0"),
        ([("optim.lr", float("inf"))], "optim.lr must be a finite number, got inf"),
        ([("eval_every", -1)], "eval_every must be >= 0, got -1"),
        ([("optim.name", "lamb"), ("optim.implementation", "compiled")],
         "optim.implementation must be one of auto, triton, foreach, single; got 'compiled'"),
    ],
)
def test_schedule_and_optimizer_options_are_checked_by_key(pairs, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, pairs)
    assert str(caught.value).startswith(message)


def test_eval_every_zero_means_no_evaluation_and_is_accepted():
    assert load_config(None, [("eval_every", 0)]).eval_every == 0


def test_every_user_error_is_a_user_error():
    """One base class for the command line's exit-status table; the old bases still hold."""
    from largebatch.checkpoint import CheckpointError
    from largebatch.data import DataError
    from largebatch.errors import DivergenceError, Preempted, UserError, exit_status
    from largebatch.models import ModelError
    from largebatch.plan.errors import PlanError

    for kind, old_base in ((ConfigError, ValueError), (DataError, ValueError), (CheckpointError, RuntimeError),
                           (PlanError, ValueError), (ModelError, ValueError)):
        assert issubclass(kind, UserError) and issubclass(kind, old_base), kind
        assert exit_status(kind("x")) == 2
    assert exit_status(DivergenceError("x")) == 3 and exit_status(Preempted("x")) == 143
    assert exit_status(ValueError("x")) is None and exit_status(RuntimeError("x")) is None
