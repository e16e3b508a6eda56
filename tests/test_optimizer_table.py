"""One table of the trainer's optimizers (issue 21 items 5-6; issue 22: lr default, LARS-only keys)."""

from __future__ import annotations

import pytest
import torch

from largebatch import cuda_graph
from largebatch.config import OPTIMIZERS, ConfigError, OptimConfig, load_config
from largebatch.optim import LAMB, LARS
from largebatch.optim._common import chosen_implementation
from largebatch.optimizer_table import COMMON_KEYS, OPTIMIZER_TABLE
from largebatch.trainer import build_optimizer


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))


def test_every_optim_key_is_common_or_read_by_some_optimizer():
    keys = {f for f in OptimConfig.__dataclass_fields__}
    read = set(COMMON_KEYS).union(*(spec.keys for spec in OPTIMIZER_TABLE.values()))
    assert keys == read
    assert set(OPTIMIZERS) == set(OPTIMIZER_TABLE)


@pytest.mark.parametrize("name", ["lamb", "sgd"])
def test_lamb_and_sgd_do_not_inherit_lars_learning_rate(name):
    config = load_config(overrides=[("optim.name", name)])
    assert config.optim.lr == OPTIMIZER_TABLE[name].default_lr
    assert config.optim.lr < 1.0  # LARS's 10 diverged LAMB (eval loss 2.5e11)
    assert load_config(overrides=[("optim.name", name), ("optim.lr", 0.5)]).optim.lr == 0.5


def test_lars_keeps_its_default_rate_and_eps():
    config = load_config()
    assert (config.optim.lr, config.optim.eps) == (10.0, 0.0)
    assert load_config(overrides=[("optim.name", "lamb")]).optim.eps == 1e-6


@pytest.mark.parametrize(("name", "key", "value"), [
    ("lamb", "optim.clip", True), ("lamb", "optim.trust_coefficient", 0.01), ("lamb", "optim.fused", True),
    ("sgd", "optim.clip", True), ("sgd", "optim.eps", 1e-8), ("lamb", "optim.momentum", 0.5),
    ("sgd", "optim.betas", [0.8, 0.9]), ("lars", "optim.betas", [0.8, 0.9]),
])
def test_a_key_the_optimizer_does_not_read_is_refused_in_one_line(name, key, value):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[("optim.name", name), (key, value)])
    text = str(err.value)
    assert f"{key} applies to" in text and f"optim.name={name}" in text and "\n" not in text


def test_fused_is_an_alias_of_the_compiled_implementation():
    config = load_config(overrides=[("optim.fused", True)])
    assert (config.optim.implementation, config.optim.fused) == ("compiled", False)
    assert load_config(overrides=[("optim.fused", True), ("optim.implementation", "compiled")]).optim.fused is False
    with pytest.raises(ConfigError, match=r"optim\.fused=true means optim\.implementation=compiled.*single"):
        load_config(overrides=[("optim.fused", True), ("optim.implementation", "single")])


def test_construction_follows_the_table():
    for name, kind in (("lars", LARS), ("lamb", LAMB), ("sgd", torch.optim.SGD)):
        config = load_config(overrides=[("optim.name", name)])
        opt = build_optimizer(config, _model(), lr=0.1)
        assert type(opt) is kind
    lamb = build_optimizer(load_config(overrides=[("optim.name", "lamb")]), _model(), lr=0.1)
    assert {g["eps"] for g in lamb.param_groups} == {1e-6}
    compiled = build_optimizer(load_config(overrides=[("optim.fused", True)]), _model(), lr=0.1)
    assert {chosen_implementation(g, torch.device("cpu")) for g in compiled.param_groups} == {"compiled"}


def test_sgd_accepts_only_the_default_path():
    with pytest.raises(ConfigError, match=r"optim\.implementation must be one of auto; got 'single'"):
        load_config(overrides=[("optim.name", "sgd"), ("optim.implementation", "single")])


def test_graph_decision_reads_the_table():
    assert set(cuda_graph.GRAPH_OPTIMIZERS) == {n for n, s in OPTIMIZER_TABLE.items() if s.tensor_lr}
    use, why = cuda_graph.graphs_decision("auto", device=torch.device("cuda"), distributed=False, fp16=False,
                                          optimizer="sgd", input_bytes=0)
    assert not use and "sgd" in why


@pytest.mark.parametrize("momentum", [1.0, 1.5, -0.1])
def test_momentum_outside_zero_one_is_refused(momentum):
    with pytest.raises(ConfigError, match=r"optim\.momentum must be in \[0, 1\)"):
        load_config(overrides=[("optim.momentum", momentum)])
