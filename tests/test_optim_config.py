"""The trainer's optimizer takes the default path unless `optim.implementation` names another."""

from __future__ import annotations

import pytest
import torch

from largebatch.config import ConfigError, load_config, validate
from largebatch.optim._common import chosen_implementation
from largebatch.trainer import build_optimizer


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_trainer_optimizer_takes_the_default_path_or_the_named_one(name):
    config = load_config(overrides=[("optim.name", name)])
    validate(config)
    opt = build_optimizer(config, _model(), lr=0.1)
    assert {chosen_implementation(g, torch.device("cpu")) for g in opt.param_groups} == {"foreach"}
    assert {chosen_implementation(g, torch.device("cuda")) for g in opt.param_groups} == {"triton"}
    config = load_config(overrides=[("optim.name", name), ("optim.implementation", "single")])
    validate(config)
    opt = build_optimizer(config, _model(), lr=0.1)
    assert {chosen_implementation(g, torch.device("cuda")) for g in opt.param_groups} == {"single"}


def test_unknown_implementation_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"optim\.implementation must be one of auto, triton"):
        validate(load_config(overrides=[("optim.implementation", "fast")]))
