"""Optimizer test helpers: a mode that fails on host syncs, the LARS option sets the tests share,
and a multi-step driver over the float64 LARS step in tests/reference.py."""

from __future__ import annotations

import numpy as np
import torch
from reference import lars_step
from torch.overrides import TorchFunctionMode


class NoHostSync(TorchFunctionMode):
    """Fails on any call that would read a tensor's value back to the host."""

    FORBIDDEN = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation inside step(): {func.__name__}")
        return func(*args, **(kwargs or {}))


def step_with(opt, params, grads, lr) -> None:
    """One optimizer step on these gradients (copied onto each parameter's device) at this lr."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g.to(p.device, copy=True)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()


def run_steps(opt, params, grads_per_step, lrs) -> None:
    """``step_with`` for each step's gradients and lr in turn."""
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        step_with(opt, params, grads, lr)


def assert_steps_without_sync_or_grad_writes(opt, params, gen) -> None:
    """Two steps on random gradients read nothing back to the host and leave every ``p.grad`` as it was."""
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    grads_before = [p.grad.clone() for p in params]
    with NoHostSync():
        opt.step()
        opt.step()
    for p, g in zip(params, grads_before, strict=True):
        assert torch.equal(p.grad, g)


# the LARS option sets every implementation is checked on (single, foreach, Triton on CPU and GPU)
LARS_CASES = {
    "plain": dict(momentum=0.9, weight_decay=5e-4, trust_coefficient=0.001, eps=0.0),
    "eps_and_strong_decay": dict(momentum=0.8, weight_decay=0.05, trust_coefficient=0.02, eps=1e-3),
    "no_momentum": dict(momentum=0.0, weight_decay=1e-3, trust_coefficient=0.01, eps=0.0),
    "nesterov": dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01, eps=0.0, nesterov=True),
    "clip": dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=2.0, eps=0.0, clip=True),
    "no_decay": dict(momentum=0.9, weight_decay=0.0, trust_coefficient=0.005, eps=0.0),
}


def lars_reference_steps(init, grads_per_step, lrs, groups_of, opts):
    """Float64 reference over several steps; groups_of[i] is True when tensor i is excluded."""
    ws = [t.double().numpy().copy() for t in init]
    vs = [np.zeros_like(w) for w in ws]
    for grads, lr in zip(grads_per_step, lrs, strict=True):
        for i, g in enumerate(grads):
            excluded = groups_of[i]
            ws[i], vs[i] = lars_step(
                ws[i], g.double().numpy(), vs[i], lr=lr, momentum=opts["momentum"],
                weight_decay=0.0 if excluded else opts["weight_decay"], eta=opts["trust_coefficient"],
                eps=opts["eps"], adapt=not excluded, clip=opts.get("clip", False),
                nesterov=opts.get("nesterov", False),
            )
    return ws
