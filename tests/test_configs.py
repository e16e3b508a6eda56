"""Every shipped config loads and validates; the demo's file and the embedded demo agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from largebatch.config import load_config, to_dict
from largebatch.demo import demo_config
from largebatch.trainer import batch_plan

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
TRAIN_CONFIGS = [p for p in CONFIGS if not p.name.startswith("sweep_")]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    config = load_config(path)
    micro, accumulation = batch_plan(config, 1)
    assert micro * accumulation == config.batch_size


def test_paper_recipes_are_the_papers():
    alexnet = load_config(Path(__file__).parent.parent / "configs" / "alexnet_bn_imagenet_32k.yaml")
    assert (alexnet.batch_size, alexnet.optim.lr, alexnet.schedule.warmup_start_lr) == (32768, 33.0, 1.0)
    assert (alexnet.optim.trust_coefficient, alexnet.optim.weight_decay, alexnet.epochs) == (0.001, 0.0005, 100)
    assert alexnet.schedule.decay_origin == "zero" and alexnet.data.options["image_size"] == 227


def test_demo_file_matches_the_embedded_demo():
    from_file = to_dict(load_config(Path(__file__).parent.parent / "configs" / "fmnist_lars_8k.yaml"))
    embedded = to_dict(demo_config(out="runs/fmnist_lars_8k"))
    for key in ("model", "data", "optim", "schedule", "batch_size", "micro_batch", "epochs"):
        assert from_file[key] == embedded[key], key
