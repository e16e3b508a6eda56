"""The trainer's optimizers (``optim.name``) in one table: what each reads, how it is built.

Validation (config.py), construction (trainer.py) and the CUDA-graph decision (cuda_graph.py)
all read this table, so a new optimizer is one row here. The optimizers themselves live in
largebatch.optim; this module only says how the trainer's config maps onto them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from largebatch.optim import LAMB, LARS
from largebatch.optim._common import IMPLEMENTATIONS
from largebatch.optim.lamb import LAMB_IMPLEMENTATIONS

__all__ = ["COMMON_KEYS", "OPTIMIZER_TABLE", "OptimizerSpec", "optimizer_spec"]

# optim.* keys every optimizer reads
COMMON_KEYS = frozenset({"name", "lr", "weight_decay", "exclude_bias_and_norm", "label_smoothing", "implementation"})


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer as the trainer sees it.

    ``keys``: the optim.* keys it reads beyond COMMON_KEYS (any other key set away from its
    default is refused). ``tensor_lr``: it reads its learning rate from a device tensor, so the
    schedule can update it without a host sync and a CUDA graph can replay its step.
    ``build(groups, lr, optim_config)`` constructs it from param_groups' groups.
    """

    default_lr: float
    lr_source: str
    keys: frozenset[str]
    implementations: tuple[str, ...]
    tensor_lr: bool
    default_eps: float | None
    build: Callable[[list[dict[str, Any]], Any, Any], torch.optim.Optimizer]


def _lars(groups: list[dict[str, Any]], lr: Any, o: Any) -> torch.optim.Optimizer:
    return LARS(groups, lr=lr, momentum=o.momentum, trust_coefficient=o.trust_coefficient, eps=o.eps,
                nesterov=o.nesterov, clip=o.clip, implementation=o.implementation)


def _lamb(groups: list[dict[str, Any]], lr: Any, o: Any) -> torch.optim.Optimizer:
    return LAMB(groups, lr=lr, betas=o.betas, eps=o.eps, implementation=o.implementation)


def _sgd(groups: list[dict[str, Any]], lr: Any, o: Any) -> torch.optim.Optimizer:
    for g in groups:
        g.pop("lars_adapt")  # torch's SGD refuses keys it does not know
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)


OPTIMIZER_TABLE: dict[str, OptimizerSpec] = {
    "lars": OptimizerSpec(
        default_lr=10.0, lr_source="the paper's AlexNet-BN rate at batch 8K",
        keys=frozenset({"momentum", "nesterov", "trust_coefficient", "eps", "clip", "fused"}),
        implementations=IMPLEMENTATIONS, tensor_lr=True, default_eps=0.0, build=_lars),
    "lamb": OptimizerSpec(
        default_lr=1e-3, lr_source="Adam's customary rate, which LAMB starts from",
        keys=frozenset({"betas", "eps"}),
        implementations=LAMB_IMPLEMENTATIONS, tensor_lr=True, default_eps=1e-6, build=_lamb),
    "sgd": OptimizerSpec(
        default_lr=0.1, lr_source="Goyal et al.'s rate at batch 256 (scale it with schedule.scaling=linear)",
        keys=frozenset({"momentum", "nesterov"}),
        implementations=("auto",), tensor_lr=False, default_eps=None, build=_sgd),
}


def optimizer_spec(name: str) -> OptimizerSpec:
    return OPTIMIZER_TABLE[name]
