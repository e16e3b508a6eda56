"""The shipped configs against the recipes they claim, the key descriptions, the plain flags and
the config rules other modules rely on (resumable keys, batch split per world size)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from largebatch.cli import _overrides, build_parser, main
from largebatch.config import (
    ConfigError,
    all_keys,
    batch_plan,
    config_differences,
    flatten_keys,
    load_config,
    to_dict,
)
from largebatch.demo import demo_config

CONFIGS = Path(__file__).parent.parent / "configs"
TRAIN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sweep_"))
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# (file, world size) -> (micro-batch, accumulation), worked out by hand: global = world x micro x accumulation
SPLITS = [
    ("alexnet_bn_imagenet_32k.yaml", 1, (256, 128)),  # 32768 / 256 on one process
    ("alexnet_bn_imagenet_32k.yaml", 16, (256, 8)),  # 16 x 256 x 8 = 32768
    ("alexnet_bn_imagenet_32k.yaml", 128, (256, 1)),  # 128 x 256 = 32768: no accumulation
    ("resnet50_imagenet_32k.yaml", 64, (256, 2)),
    ("fmnist_lars_8k.yaml", 1, (128, 64)),  # the demo: 8192 = 64 micro-batches of 128
    ("fmnist_sgd_8k.yaml", 2, (128, 32)),
]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert load_config(path).out.startswith("runs/")


@pytest.mark.parametrize(("name", "world", "split"), SPLITS)
def test_global_batch_splits_as_worked_out_by_hand(name, world, split):
    assert batch_plan(load_config(CONFIGS / name), world) == split


@pytest.mark.parametrize("name", ["alexnet_bn_imagenet_32k.yaml", "resnet50_imagenet_32k.yaml"])
def test_the_papers_2048_processes(name):
    """The paper's runs: 2,048 processors at 32K are 16 images each; micro-batch 256 cannot be kept."""
    config = load_config(CONFIGS / name, [("micro_batch", None)])
    assert batch_plan(config, 2048) == (16, 1)
    with pytest.raises(ConfigError, match=r"world size 2048 x micro_batch 256 \(= 524288\)"):
        batch_plan(load_config(CONFIGS / name), 2048)
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        batch_plan(config, 3)


def test_paper_recipes_are_the_papers():
    alexnet = load_config(CONFIGS / "alexnet_bn_imagenet_32k.yaml")
    assert (alexnet.batch_size, alexnet.optim.lr, alexnet.schedule.warmup_start_lr) == (32768, 33.0, 1.0)
    assert (alexnet.optim.trust_coefficient, alexnet.optim.weight_decay, alexnet.epochs) == (0.001, 0.0005, 100)
    assert alexnet.schedule.decay_origin == "zero" and alexnet.data.options["image_size"] == 227
    assert (alexnet.schedule.decay, alexnet.schedule.power, alexnet.optim.momentum) == ("poly", 2.0, 0.9)
    # ImageNet's 1,281,167 images at 32,768 are 39 steps per epoch: 10 warm-up epochs, 100 in all
    steps = 1_281_167 // alexnet.batch_size
    assert (steps, alexnet.schedule.warmup_epochs * steps, alexnet.epochs * steps) == (39, 390, 3900)
    resnet = load_config(CONFIGS / "resnet50_imagenet_32k.yaml")
    # MLPerf's LARS schedule from batch 32K: base 31.2, 25 warm-up epochs, poly 2 to 1e-4; 90 epochs
    assert (resnet.batch_size, resnet.optim.lr, resnet.schedule.warmup_epochs) == (32768, 31.2, 25)
    assert (resnet.schedule.power, resnet.schedule.end_lr, resnet.epochs) == (2.0, 1e-4, 90)


def test_demo_steps_per_epoch_on_fashion_mnist():
    """60,000 training images at 8,192: 7 steps per epoch (the last partial batch dropped), 280 in 40 epochs."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    from largebatch.data import build_dataset

    config = load_config(CONFIGS / "fmnist_lars_8k.yaml")
    data = build_dataset(config.data.name, root=None, device="cpu", seed=0, augment=False)
    assert data.num_train == 60_000
    assert data.steps_per_epoch(config.batch_size) == 7 and config.epochs * 7 == 280


def test_demo_file_matches_the_embedded_demo():
    from_file = to_dict(load_config(CONFIGS / "fmnist_lars_8k.yaml"))
    embedded = to_dict(demo_config(out="runs/fmnist_lars_8k"))
    for key in ("model", "data", "optim", "schedule", "batch_size", "micro_batch", "epochs"):
        assert from_file[key] == embedded[key], key


def test_keys_lists_every_key_with_its_default_and_a_description(capsys):
    assert main(["train", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    parsed = [re.fullmatch(r"(\S+) = (.+?) +# (.+)", line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if not m]
    assert [m.group(1) for m in parsed] == all_keys()
    described = {m.group(1): (m.group(2), m.group(3)) for m in parsed}
    assert described["batch_size"][0] == "8192" and described["optim.betas"][0] == "(0.9, 0.999)"
    assert all(len(about) > 10 for _, about in described.values())


@pytest.mark.parametrize(("flags", "pairs"), [
    (["--device", "cpu"], [("device", "cpu")]),
    (["--workers", "3"], [("data.options.workers", 3)]),
    (["--compile"], [("model.compile", True)]),
    (["--compile", "--no-progress", "--device", "cuda"],
     [("device", "cuda"), ("model.compile", True), ("progress", False)]),
])
def test_plain_flags_set_their_keys(flags, pairs):
    assert _overrides(build_parser().parse_args(["train", *flags])) == pairs


def test_workers_flag_reaches_the_dataset_options():
    config = load_config(CONFIGS / "resnet50_imagenet_32k.yaml", _overrides(build_parser().parse_args(
        ["train", "--workers", "2"])))
    assert config.data.options == {"workers": 2}


def test_resumable_changes_and_flattening():
    old = to_dict(load_config(None))
    assert config_differences(old, to_dict(load_config(None, [("eval_every", 0), ("device", "cpu")]))) == []
    changed = to_dict(load_config(None, [("optim.lr", 3.0), ("model.options.width", 8), ("schedule.power", 1.0)]))
    assert config_differences(old, changed) == ["model.options", "optim.lr", "schedule.power"]
    spec_like = {"model": {"name": "mlp", "options": {"hidden": 4}}, "optim.lr": 2, "epochs": 3}
    assert flatten_keys(spec_like) == {"model.name": "mlp", "model.options": {"hidden": 4}, "optim.lr": 2, "epochs": 3}


def test_the_command_line_parser_builds_without_torch():
    """`largebatch --help` and `largebatch plan` stay fast: no torch until a command needs it."""
    import subprocess
    import sys

    code = "import sys; from largebatch.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_key_inside_a_mapping_survives_the_mapping_being_set():
    """`--workers 2 --set data.options={...}`: the flag's key lands inside the new mapping."""
    pairs = [("data.options.workers", 2), ("data.options", {"image_size": 16}), ("optim.lr", 1.0), ("optim.lr", 2.0)]
    config = load_config(None, pairs)
    assert config.data.options == {"image_size": 16, "workers": 2}
    assert config.optim.lr == 2.0  # the same key: the later one wins


def test_the_defaults_set_up_a_run(tmp_path):
    """`largebatch train` with no arguments: the defaults fit together (data, model, batch split)."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    from largebatch.trainer import Trainer

    trainer = Trainer(load_config(None, [("out", str(tmp_path / "run")), ("device", "cpu"), ("threads", 1)]))
    assert (trainer.micro_batch, trainer.accumulation, trainer.steps_per_epoch) == (8192, 1, 60_000 // 8192)
    assert (tmp_path / "run" / "config.yaml").is_file()
