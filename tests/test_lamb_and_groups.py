"""LAMB against its float64 reference; parameter groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import lamb_step
from support.optim import step_with

from largebatch.optim import LAMB, LARS, param_groups

SHAPES = [(5, 4), (6,), (3, 2, 3, 3)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.02])
def test_lamb_matches_float64_reference(foreach, weight_decay, seed):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    init[1].zero_()
    params = [torch.nn.Parameter(t.clone()) for t in init]
    groups = [{"params": [params[0], params[2]]}, {"params": [params[1]], "lars_adapt": False}]
    opt = LAMB(groups, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay, foreach=foreach)
    ref = [(t.numpy().copy(), np.zeros(t.shape), np.zeros(t.shape)) for t in init]
    for t, lr in enumerate([0.01, 0.02, 0.005, 0.03], start=1):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        step_with(opt, params, grads, lr)
        ref = [
            lamb_step(w, g.numpy(), m, v, t, lr=lr, beta1=0.9, beta2=0.99, eps=1e-6,
                      weight_decay=weight_decay, adapt=(i != 1))
            for i, ((w, m, v), g) in enumerate(zip(ref, grads, strict=True))
        ]
    for p, (w, _, _) in zip(params, ref, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=1e-10, atol=1e-13)


def test_lamb_state_dict_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(4)]

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs, strict=True):
                p.grad = g.clone()
            opt.step()

    a = [torch.nn.Parameter(t.clone()) for t in init]
    run(a, LAMB(a, lr=0.01, weight_decay=0.01), grads)
    b = [torch.nn.Parameter(t.clone()) for t in init]
    opt_b = LAMB(b, lr=0.01, weight_decay=0.01)
    run(b, opt_b, grads[:2])
    c = [torch.nn.Parameter(t.detach().clone()) for t in b]
    opt_c = LAMB(c, lr=0.01, weight_decay=0.01)
    opt_c.load_state_dict(opt_b.state_dict())
    run(c, opt_c, grads[2:])
    for x, y in zip(a, c, strict=True):
        assert torch.equal(x, y)


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2)
    )


def test_param_groups_default_excludes_biases_and_norms_from_both():
    model = _model()
    groups = param_groups(model, weight_decay=1e-4)
    by_flags = {(g["lars_adapt"], g["weight_decay"]): g["params"] for g in groups}
    assert set(by_flags) == {(True, 1e-4), (False, 0.0)}
    adapted = by_flags[(True, 1e-4)]
    assert [p.ndim for p in adapted] == [4, 2]
    assert all(p.ndim == 1 for p in by_flags[(False, 0.0)])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_param_groups_choices_are_separate():
    model = _model()
    groups = param_groups(model, weight_decay=1e-4, exclude_from_decay=False)
    flags = sorted((g["lars_adapt"], g["weight_decay"], len(g["params"])) for g in groups)
    assert flags == [(False, 1e-4, 4), (True, 1e-4, 2)]
    only_bn = param_groups(model, 1e-4, exclude_from_adaptation=lambda n, p: n.startswith("1."))
    excluded = next(g for g in only_bn if not g["lars_adapt"])["params"]
    assert len(excluded) == 2 and all(p.ndim == 1 for p in excluded)


def test_param_groups_skip_frozen_parameters_and_feed_lars():
    model = _model()
    model[0].weight.requires_grad_(False)
    groups = param_groups(model, 1e-4)
    assert all(p is not model[0].weight for g in groups for p in g["params"])
    LARS(groups, lr=0.1)  # accepted as-is


def test_param_groups_refuse_a_bad_selector():
    with pytest.raises(TypeError, match="exclusion must be a callable"):
        param_groups(_model(), 1e-4, exclude_from_decay="biases")


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lamb_moves_low_precision_params_as_the_float64_reference_does(dtype, foreach, seed):
    """bf16/fp16 parameters follow the reference computed from the same rounded start and gradients.

    The bias corrections must not be computed in the parameter's dtype: in bf16, 0.999 rounds to 1,
    1 - 0.999**t is 0 and the direction vanishes (the parameters never move).
    """
    gen = torch.Generator().manual_seed(seed)
    init = [(0.5 * torch.randn(s, generator=gen)).to(dtype) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = LAMB(params, lr=0.1, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, foreach=foreach)
    ref = [(t.double().numpy(), np.zeros(t.shape), np.zeros(t.shape)) for t in init]
    for t in range(1, 4):
        # |g| >= 0.5: (1 - b2) * g^2 stays above fp16's smallest values (a smaller one flushes
        # the second moment to 0 in fp16 storage, whatever the optimizer)
        raw = [torch.randn(s, generator=gen) for s in SHAPES]
        grads = [(r.sign() * (0.5 + r.abs())).to(dtype) for r in raw]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        ref = [lamb_step(w, g.double().numpy(), m, v, t, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6,
                         weight_decay=0.01) for (w, m, v), g in zip(ref, grads, strict=True)]
    for p, w0, (w, _, _) in zip(params, init, ref, strict=True):
        moved = np.abs(w - w0.double().numpy()).max()
        ulp = torch.finfo(dtype).eps * float(np.abs(w).max())
        assert moved > 10 * ulp  # the reference moves the tensor by far more than its rounding
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=0, atol=4 * ulp)
