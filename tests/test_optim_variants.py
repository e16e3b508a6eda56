"""Every published LARS/LAMB variant, on every path that computes it, against float64 references
written from each codebase's formula (tests/reference.py), over 100 steps of warm-up + cosine."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from reference import lamb_published_step, lars_published_step
from support.optim import assert_steps_without_sync_or_grad_writes

from largebatch.optim import LAMB, LARS, VARIANTS, variant
from largebatch.optim._common import chosen_implementation

# What each codebase does, read from its source (docs/optimizers.md cites them); kept here apart
# from largebatch.optim.variants so that a wrong table there fails here.
LARS_PUBLISHED = {
    "paper": dict(lr_in_momentum=True, denominator="sum", zero_norm="unit", clip=False, eta=1e-3, eps=0.0,
                  momentum=0.9, adapt_without_decay=True, exclude="none"),
    "timm-lars": dict(lr_in_momentum=False, denominator="sum", zero_norm="unit", clip=False, eta=1e-3, eps=1e-8,
                      momentum=0.9, adapt_without_decay=False, exclude="decay"),
    "timm-larc": dict(lr_in_momentum=False, denominator="sum", zero_norm="unit", clip="larc", eta=1e-3, eps=1e-8,
                      momentum=0.9, adapt_without_decay=False, exclude="decay"),
    "lightly": dict(lr_in_momentum=False, denominator="sum", zero_norm="skip", clip=False, eta=1e-3, eps=1e-8,
                    momentum=0.0, adapt_without_decay=False, exclude="none"),
    "solo-learn": dict(lr_in_momentum=False, denominator="sum", zero_norm="skip", clip="larc", eta=0.02, eps=1e-8,
                       momentum=0.9, adapt_without_decay=True, exclude="both"),
    "vicreg": dict(lr_in_momentum=False, denominator="update", zero_norm="unit", clip=False, eta=1e-3, eps=0.0,
                   momentum=0.9, adapt_without_decay=True, exclude="both"),
    "byol": dict(lr_in_momentum=True, denominator="update", zero_norm="unit", clip=False, eta=1e-3, eps=0.0,
                 momentum=0.9, adapt_without_decay=True, exclude="both"),
    "simclr": dict(lr_in_momentum=True, denominator="update", zero_norm="unit", clip=False, eta=1e-3, eps=0.0,
                   momentum=0.9, adapt_without_decay=True, exclude="both"),
    "vissl": dict(lr_in_momentum=False, denominator="update", zero_norm="unit", clip=False, eta=1e-3, eps=0.0,
                  momentum=0.9, adapt_without_decay=True, exclude="ratio"),
    "apex-larc": dict(lr_in_momentum=False, denominator="sum", zero_norm="skip", clip="larc", eta=0.02, eps=1e-8,
                      momentum=0.9, adapt_without_decay=True, exclude="none"),
}
LAMB_PUBLISHED = {
    "timm-lamb": dict(max_grad_norm=1.0, adapt_without_decay=False, exclude="decay"),
    "apex-lamb": dict(max_grad_norm=1.0, adapt_without_decay=False, exclude="none"),
    "apex-nvlamb": dict(max_grad_norm=1.0, adapt_without_decay=True, exclude="none"),
    "lamb-paper": dict(max_grad_norm=None, adapt_without_decay=True, exclude="none"),
}
# 1-D tensor treatment per exclusion policy: (ratio allowed, decay kept)
ONE_D = {"none": (True, True), "both": (False, False), "decay": (True, False), "ratio": (False, True)}

SHAPES = [(6, 4), (5,), (5,), (3, 2, 2), (4, 3), (7,)]
ZERO_INIT = (2, 4)  # an all-zero bias and an all-zero matrix: ||w|| = 0 at the start
STEPS = 100


def _lr(step: int, peak: float) -> float:
    """Linear warm-up from 0 over 10 steps, then cosine to 0 at step 100: lr changes every step."""
    if step < 10:
        return peak * step / 10
    return peak * 0.5 * (1 + math.cos(math.pi * (step - 10) / (STEPS - 10)))


def _problem(seed: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Initial tensors and 100 steps of gradients (some all-zero, scales varying 20x)."""
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s) for s in SHAPES]
    for i in ZERO_INIT:
        init[i][...] = 0.0
    grads = []
    for step in range(STEPS):
        scale = 0.05 if step % 2 else 1.0
        gs = [scale * rng.standard_normal(s) for s in SHAPES]
        if step % 7 == 3:
            gs[0][...] = 0.0  # ||g|| = 0 on an adapted matrix
            gs[1][...] = 0.0
        grads.append(gs)
    return init, grads


def _run(opt_factory, init, grads, dtype, peak):
    params = [torch.nn.Parameter(torch.tensor(w, dtype=dtype)) for w in init]
    opt = opt_factory(params)
    for step, gs in enumerate(grads):
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.tensor(g, dtype=dtype)
        for group in opt.param_groups:
            group["lr"] = _lr(step, peak)
        opt.step()
    return [p.detach().double().numpy() for p in params], opt


def _lars_reference(expected, init, grads, peak, weight_decay, **extra):
    keep_ratio, keep_decay = ONE_D[expected["exclude"]]
    ws = [w.copy() for w in init]
    vs: list = [None] * len(ws)
    for step, gs in enumerate(grads):
        for i, g in enumerate(gs):
            low = ws[i].ndim <= 1
            ws[i], vs[i] = lars_published_step(
                ws[i], g, vs[i], lr=_lr(step, peak), momentum=expected["momentum"],
                weight_decay=weight_decay if (keep_decay or not low) else 0.0, eta=expected["eta"],
                eps=expected["eps"], lr_in_momentum=expected["lr_in_momentum"],
                denominator=expected["denominator"], zero_norm=expected["zero_norm"], clip=expected["clip"],
                adapt=keep_ratio or not low, adapt_without_decay=expected["adapt_without_decay"], **extra,
            )
    return ws


def _lamb_reference(expected, init, grads, peak, weight_decay, **extra):
    keep_ratio, keep_decay = ONE_D[expected["exclude"]]
    ws = [w.copy() for w in init]
    ms = [np.zeros_like(w) for w in ws]
    vs = [np.zeros_like(w) for w in ws]
    for step, gs in enumerate(grads):
        divisor = 1.0
        if expected["max_grad_norm"] is not None:
            total = math.sqrt(sum(float(np.sum(g * g)) for g in gs))
            divisor = max(total / expected["max_grad_norm"], 1.0)
        for i, g in enumerate(gs):
            low = ws[i].ndim <= 1
            ws[i], ms[i], vs[i] = lamb_published_step(
                ws[i], g, ms[i], vs[i], step + 1, lr=_lr(step, peak), beta1=0.9, beta2=0.999, eps=1e-6,
                weight_decay=weight_decay if (keep_decay or not low) else 0.0, clip_divisor=divisor,
                adapt=keep_ratio or not low, adapt_without_decay=expected["adapt_without_decay"], **extra,
            )
    return ws


def _check(got, want, init, dtype):
    moved = max(float(np.abs(w - w0).max()) for w, w0 in zip(want, init, strict=True))
    assert moved > 1e-3  # the steps are far above the tolerance
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if dtype == torch.float64:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=f"tensor {i}")
        else:
            assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-3), f"tensor {i}"


def _as_held(init, dtype):
    """The starting weights as the optimizer holds them (rounded to float32 for a float32 run), in float64."""
    return [w.astype(np.float32).astype(np.float64) if dtype == torch.float32 else w for w in init]


PATHS = ["single", "foreach"]
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LARS_PUBLISHED)
def test_lars_variant_follows_its_codebase_formula_under_a_changing_lr(name, path, dtype, seed):
    init, grads = _problem(seed)
    expected = LARS_PUBLISHED[name]
    factory = lambda ps: variant(name, ps, lr=0.0, weight_decay=1e-3, implementation=path)  # noqa: E731
    got, _ = _run(factory, [w.astype(np.float32 if dtype == torch.float32 else np.float64) for w in init],
                  grads, dtype, peak=2.0)
    start = _as_held(init, dtype)
    want = _lars_reference(expected, start, grads, 2.0, 1e-3)
    _check(got, want, start, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", LAMB_PUBLISHED)
def test_lamb_variant_follows_its_codebase_formula_under_a_changing_lr(name, path, dtype, seed):
    init, grads = _problem(seed)
    expected = LAMB_PUBLISHED[name]
    factory = lambda ps: variant(name, ps, weight_decay=0.01, implementation=path)  # noqa: E731
    got, _ = _run(factory, init, grads, dtype, peak=0.05)
    start = _as_held(init, dtype)
    want = _lamb_reference(expected, start, grads, 0.05, 0.01)
    _check(got, want, start, dtype)


LARS_OPTIONS = {  # option sets no variant uses: each option on its own axis
    "torch_style_dampening": dict(lr_in_momentum=False, dampening=0.3, clip=True, zero_norm="skip"),
    "torch_style_nesterov": dict(lr_in_momentum=False, nesterov=True, denominator="update"),
    "paper_update_skip_larc": dict(denominator="update", zero_norm="skip", clip="larc", nesterov=True),
    "paper_dampening_no_ratio_without_decay": dict(dampening=0.5, adapt_without_decay=False),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", LARS_OPTIONS)
def test_lars_options_off_the_variants_follow_the_formula(case, path, seed):
    init, grads = _problem(seed)
    opts = LARS_OPTIONS[case]
    params = [torch.nn.Parameter(torch.tensor(w)) for w in init]
    low = [p for p in params if p.ndim <= 1]
    high = [p for p in params if p.ndim > 1]
    groups = [{"params": high}, {"params": low, "weight_decay": 0.0}]
    opt = LARS(groups, lr=0.0, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.01, eps=1e-9,
               implementation=path, **opts)
    for step, gs in enumerate(grads):
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.tensor(g)
        for group in opt.param_groups:
            group["lr"] = _lr(step, 2.0)
        opt.step()
    expected = dict(lr_in_momentum=opts.get("lr_in_momentum", True), denominator=opts.get("denominator", "sum"),
                    zero_norm=opts.get("zero_norm", "unit"), clip=opts.get("clip", False), eta=0.01, eps=1e-9,
                    momentum=0.9, adapt_without_decay=opts.get("adapt_without_decay", True), exclude="decay")
    want = _lars_reference(expected, init, grads, 2.0, 1e-3, dampening=opts.get("dampening", 0.0),
                           nesterov=opts.get("nesterov", False))
    _check([p.detach().numpy() for p in params], want, init, torch.float64)


LAMB_OPTIONS = {
    "no_bias_correction_no_averaging_trust_clip": dict(bias_correction=False, grad_averaging=False, trust_clip=True),
    "l2_with_clipping": dict(adam_w_mode=False, max_grad_norm=2.0),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", LAMB_OPTIONS)
def test_lamb_options_off_the_variants_follow_the_formula(case, path, seed):
    init, grads = _problem(seed)
    opts = LAMB_OPTIONS[case]
    factory = lambda ps: LAMB(ps, lr=0.0, weight_decay=0.01, implementation=path, **opts)  # noqa: E731
    got, _ = _run(factory, init, grads, torch.float64, peak=0.05)
    expected = dict(max_grad_norm=opts.get("max_grad_norm"), adapt_without_decay=True, exclude="none")
    extra = {k: v for k, v in opts.items() if k != "max_grad_norm"}
    want = _lamb_reference(expected, init, grads, 0.05, 0.01, **extra)
    _check(got, want, init, torch.float64)


def test_lars_dampening_without_ratio_is_torch_sgd(seed):
    """Two ways of computing one thing: lr outside the buffer, no ratio, dampening = torch's SGD."""
    init, grads = _problem(seed)
    ours = [torch.nn.Parameter(torch.tensor(w)) for w in init]
    theirs = [torch.nn.Parameter(torch.tensor(w)) for w in init]
    opt = LARS([{"params": ours, "lars_adapt": False}], lr=0.1, momentum=0.9, dampening=0.25, weight_decay=1e-3,
               lr_in_momentum=False)
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, dampening=0.25, weight_decay=1e-3)
    for step, gs in enumerate(grads[:30]):
        for o, ps in ((opt, ours), (sgd, theirs)):
            for p, g in zip(ps, gs, strict=True):
                p.grad = torch.tensor(g)
            for group in o.param_groups:
                group["lr"] = _lr(step, 2.0)
            o.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _timm():
    return pytest.importorskip("timm.optim")


@pytest.mark.parametrize("name, make", [
    ("timm-lars", lambda optim, groups: optim.Lars(groups, lr=0.0, momentum=0.9)),
    ("timm-larc", lambda optim, groups: optim.Lars(groups, lr=0.0, momentum=0.9, trust_clip=True)),
    ("timm-lamb", lambda optim, groups: optim.Lamb(groups, lr=0.0)),
])
def test_timm_variants_match_timms_own_optimizers(name, make, seed):
    """timm is installed for the benchmarks: its own code, given the groups its create_optimizer
    builds (1-D tensors without decay), against variant(name) given plain parameters."""
    optim = _timm()
    init, grads = _problem(seed)
    peak, wd = (2.0, 1e-3) if "lars" in name or "larc" in name else (0.05, 0.01)
    ours, _ = _run(lambda ps: variant(name, ps, lr=0.0, weight_decay=wd), init, grads, torch.float64, peak)

    def build(ps):
        return make(optim, [{"params": [p for p in ps if p.ndim > 1], "weight_decay": wd},
                            {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0}])

    theirs, _ = _run(build, init, grads, torch.float64, peak)
    _check(ours, theirs, init, torch.float64)


def test_variant_table_lists_the_names_with_one_line_descriptions():
    required = {"paper", "timm-lars", "timm-larc", "lightly", "solo-learn", "vicreg", "byol", "simclr", "vissl",
                "apex-larc", "timm-lamb", "apex-lamb", "lamb-paper"}
    assert required <= set(VARIANTS)
    assert set(LARS_PUBLISHED) | set(LAMB_PUBLISHED) == set(VARIANTS)
    for spec in VARIANTS.values():
        assert spec.description and "\n" not in spec.description and spec.source


def test_variant_refuses_unknown_names_and_options_in_one_line():
    params = [torch.nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match=r"unknown optimizer variant 'lars'; known: paper, timm-lars, .*lamb-paper"):
        variant("lars", params, lr=0.1)
    with pytest.raises(TypeError, match=r"'vicreg' \(LARS\) takes lr, .*; not betas"):
        variant("vicreg", params, lr=0.1, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match="'vicreg' has no default learning rate"):
        variant("vicreg", params)


def test_variant_overrides_and_groups_given_as_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    opt = variant("timm-lamb", model, lr=0.02, max_grad_norm=None, betas=(0.8, 0.9))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]  # weight; bias and norm tensors
    assert opt.param_groups[0]["max_grad_norm"] is None and opt.param_groups[0]["betas"] == (0.8, 0.9)
    groups = [{"params": list(model.parameters()), "weight_decay": 0.5, "lr": 0.3}]
    opt = variant("timm-lamb", groups)  # timm excludes when it builds groups: given ones are kept
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.5
    opt = variant("vicreg", groups, lr=0.1)  # VICReg's optimizer tests each tensor itself
    assert [(len(g["params"]), g["lars_adapt"], g["weight_decay"], g["lr"]) for g in opt.param_groups] == [
        (1, True, 0.5, 0.3), (3, False, 0.0, 0.3)]
    assert opt.param_groups[0]["denominator"] == "update" and not opt.param_groups[0]["lr_in_momentum"]


def test_kernel_paths_refuse_options_they_do_not_compute_and_auto_avoids_them():
    params = [torch.nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match=r"LARS\(implementation='compiled'\) does not compute lr_in_momentum=False"):
        LARS(params, lr=0.1, lr_in_momentum=False, implementation="compiled")
    with pytest.raises(ValueError, match=r"LARS\(implementation='triton'\) does not compute clip='larc'"):
        LARS(params, lr=0.1, clip="larc", implementation="triton")
    with pytest.raises(ValueError, match=r"LAMB\(implementation='triton'\) does not compute max_grad_norm=1.0"):
        LAMB(params, lr=0.1, max_grad_norm=1.0, implementation="triton")
    cuda = torch.device("cuda")
    for name, spec in VARIANTS.items():
        opt = variant(name, params, lr=0.1)
        on_gpu = {chosen_implementation(g, cuda) for g in opt.param_groups}
        kernels_compute = all(k not in spec.options for k in (
            "lr_in_momentum", "denominator", "zero_norm", "clip", "max_grad_norm"))
        assert on_gpu == ({"triton"} if kernels_compute else {"foreach"}), name


def _trained(opt, params, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


def test_state_records_the_variant_and_a_state_of_another_convention_is_refused():
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))]
    torch_style = variant("vicreg", params, lr=0.1)
    _trained(torch_style, params)
    state = torch_style.state_dict()
    assert {g["variant"] for g in state["param_groups"]} == {"vicreg"}
    assert {g["lr_in_momentum"] for g in state["param_groups"]} == {False}
    again = variant("vicreg", params, lr=0.1)
    again.load_state_dict(state)  # same convention: accepted
    paper_groups = [{"params": [params[0]]}, {"params": [params[1]]}]
    paper = LARS(paper_groups, lr=0.1)
    with pytest.raises(ValueError, match=r"written with lr_in_momentum=False and this optimizer has "
                                         r"lr_in_momentum=True; .* refused"):
        paper.load_state_dict(state)
    sgd = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1, momentum=0.9)
    _trained(sgd, params)
    with pytest.raises(ValueError, match=r"lacks trust_coefficient, lars_adapt: it was not written by largebatch"):
        paper.load_state_dict(sgd.state_dict())
    lamb = LAMB(params, lr=0.1)
    other = LAMB(params, lr=0.1, grad_averaging=False)
    _trained(other, params)
    with pytest.raises(ValueError, match="written with grad_averaging=False"):
        lamb.load_state_dict(other.state_dict())


def test_a_timm_state_is_refused_instead_of_failing_at_the_next_step():
    optim = _timm()
    params = [torch.nn.Parameter(torch.ones(3, 2))]
    theirs = optim.Lars(params, lr=0.1, momentum=0.9)
    _trained(theirs, params)
    with pytest.raises(ValueError, match="lacks trust_coefficient, lars_adapt"):
        LARS(params, lr=0.1, lr_in_momentum=False).load_state_dict(theirs.state_dict())


def test_a_state_written_before_the_options_existed_loads_as_the_paper_convention():
    params = [torch.nn.Parameter(torch.ones(3, 2))]
    opt = LARS(params, lr=0.1)
    _trained(opt, params)
    state = opt.state_dict()
    for group in state["param_groups"]:
        for key in ("dampening", "lr_in_momentum", "denominator", "zero_norm", "adapt_without_decay", "variant"):
            del group[key]
    fresh = LARS(params, lr=0.1)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr_in_momentum"] is True and fresh.param_groups[0]["zero_norm"] == "unit"
    _trained(fresh, params, steps=1)
    with pytest.raises(ValueError, match="written with lr_in_momentum=True"):
        LARS(params, lr=0.1, lr_in_momentum=False).load_state_dict(state)


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_add_param_group_checks_as_the_constructor_does(cls):
    opt = cls([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match="implementation must be one of"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "implementation": "tritonn"})
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": -1.0})
    assert len(opt.param_groups) == 1  # the refused groups are not kept
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.2})
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("make", [
    lambda ps: LARS(ps, lr=0.1), lambda ps: LAMB(ps, lr=0.1),
    lambda ps: LAMB([{"params": ps, "lars_adapt": False}], lr=0.1),
])
def test_complex_parameters_are_refused_in_one_line(make):
    with pytest.raises(TypeError, match=r"does not support complex parameters \(got a torch.complex64 tensor"):
        make([torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))])


@pytest.mark.parametrize("kwargs, message", [
    (dict(clip="lars"), "clip must be False, True or 'larc'"),
    (dict(denominator="norm"), "denominator must be one of sum, update"),
    (dict(zero_norm="one"), "zero_norm must be one of unit, skip"),
    (dict(dampening=-0.1), "dampening must be >= 0"),
    (dict(nesterov=True, dampening=0.1), "nesterov=True needs dampening = 0"),
])
def test_bad_lars_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LARS([torch.nn.Parameter(torch.ones(2))], lr=0.1, **kwargs)


def test_docs_describe_every_variant():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "optimizers.md").read_text()
    for name in VARIANTS:
        assert f"| `{name}` |" in text, name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_step_never_syncs_and_never_writes_grad(name, path, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = variant(name, params, lr=torch.tensor(0.1), implementation=path)
    if name == "lightly":
        opt.param_groups[0].update(momentum=0.9, dampening=0.1)  # the buffer's first-step rule too
    assert_steps_without_sync_or_grad_writes(opt, params, gen)


def test_the_two_momentum_conventions_agree_at_a_constant_lr_and_part_under_a_schedule(seed):
    """With lr fixed, lr*v (paper) and v (torch) are the same update; once lr moves they are not."""
    init, grads = _problem(seed)

    def final(lr_in_momentum, peak, constant):
        params = [torch.nn.Parameter(torch.tensor(w)) for w in init]
        opt = LARS(params, lr=peak, weight_decay=1e-3, trust_coefficient=0.01, lr_in_momentum=lr_in_momentum)
        for step, gs in enumerate(grads[:40]):
            for p, g in zip(params, gs, strict=True):
                p.grad = torch.tensor(g)
            opt.param_groups[0]["lr"] = peak if constant else _lr(step + 1, peak)
            opt.step()
        return [p.detach().numpy() for p in params]

    for a, b in zip(final(True, 2.0, True), final(False, 2.0, True), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    apart = max(np.abs(a - b).max() for a, b in zip(final(True, 2.0, False), final(False, 2.0, False), strict=True))
    assert apart > 1e-3


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_lr_as_a_tensor_equals_lr_as_a_float(name, path, seed):
    init, grads = _problem(seed)
    lars = VARIANTS[name].optimizer == "LARS"
    extra = dict(momentum=0.9, weight_decay=1e-3) if lars else dict(weight_decay=0.01)
    runs = []
    for as_tensor in (False, True):
        params = [torch.nn.Parameter(torch.tensor(w)) for w in init]
        opt = variant(name, params, lr=0.0, implementation=path, **extra)
        if lars:
            opt.param_groups[0]["nesterov"] = name == "timm-lars"  # the nesterov branch too
        for step, gs in enumerate(grads[:25]):
            for p, g in zip(params, gs, strict=True):
                p.grad = torch.tensor(g)
            for group in opt.param_groups:
                lr = _lr(step, 2.0 if lars else 0.05)
                group["lr"] = torch.tensor(lr, dtype=torch.float64) if as_tensor else lr
            opt.step()
        runs.append([p.detach().numpy() for p in params])
    for a, b in zip(*runs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("name", ["paper", "lamb-paper"])
def test_variants_the_kernels_compute_follow_the_formula_on_triton(name, seed, monkeypatch):
    """Triton's CPU interpreter runs the GPU kernels: float32, the first 30 steps of the schedule
    (warm-up and the start of the cosine: the interpreter takes 0.15 s a step)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    init, grads = _problem(seed)
    grads = grads[:30]
    start = [w.astype(np.float32).astype(np.float64) for w in init]
    if name in LARS_PUBLISHED:
        got, _ = _run(lambda ps: variant(name, ps, lr=0.0, weight_decay=1e-3, implementation="triton"),
                      [w.astype(np.float32) for w in init], grads, torch.float32, 2.0)
        want = _lars_reference(LARS_PUBLISHED[name], start, grads, 2.0, 1e-3)
    else:
        got, _ = _run(lambda ps: variant(name, ps, weight_decay=0.01, implementation="triton"),
                      [w.astype(np.float32) for w in init], grads, torch.float32, 0.05)
        want = _lamb_reference(LAMB_PUBLISHED[name], start, grads, 0.05, 0.01)
    _check(got, want, start, torch.float32)


@pytest.mark.parametrize("name, make", [
    ("timm-lars", lambda optim, groups: optim.Lars(groups, lr=0.0, momentum=0.9)),
    ("timm-lamb", lambda optim, groups: optim.Lamb(groups, lr=0.0)),
])
def test_a_peer_state_loads_into_its_variant_exactly(name, make, seed):
    """timm trains 40 steps; its state loads into variant(name); both go on for 40 more steps."""
    optim = _timm()
    init, grads = _problem(seed)
    peak, wd = (2.0, 1e-3) if name == "timm-lars" else (0.05, 0.01)

    def groups(ps):
        return [{"params": [p for p in ps if p.ndim > 1], "weight_decay": wd},
                {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0}]

    def steps(opt, params, first):
        for step in range(first, first + 40):
            for p, g in zip(params, grads[step], strict=True):
                p.grad = torch.tensor(g)
            for group in opt.param_groups:
                group["lr"] = _lr(step, peak)
            opt.step()

    theirs = [torch.nn.Parameter(torch.tensor(w)) for w in init]
    timm_opt = make(optim, groups(theirs))
    steps(timm_opt, theirs, 0)
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    mine = variant(name, ours, lr=0.0, weight_decay=wd)
    mine.load_state_dict(copy.deepcopy(timm_opt.state_dict()))  # as a checkpoint holds it: no shared buffers
    assert all(g["variant"] == name for g in mine.param_groups)
    steps(timm_opt, theirs, 40)
    steps(mine, ours, 40)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_a_vicreg_state_loads_with_its_buffer_renamed():
    params = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))]
    buffers = [torch.full((3, 2), 0.5), torch.full((2,), -0.25)]
    theirs = {"state": {0: {"mu": buffers[0]}, 1: {"mu": buffers[1]}},
              "param_groups": [{"lr": 0.3, "weight_decay": 1e-6, "momentum": 0.9, "eta": 0.001,
                                "weight_decay_filter": None, "lars_adaptation_filter": None, "params": [0]},
                               {"lr": 0.3, "weight_decay": 0.0, "momentum": 0.9, "eta": 0.001,
                                "weight_decay_filter": None, "lars_adaptation_filter": None, "params": [1]}]}
    opt = variant("vicreg", params, lr=0.0)
    opt.load_state_dict(theirs)
    assert [torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, buffers, strict=True)] == [
        True, True]
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.3]
    assert opt.param_groups[0]["denominator"] == "update" and opt.param_groups[1]["lars_adapt"] is False
    with pytest.raises(ValueError, match="lacks trust_coefficient, lars_adapt"):
        variant("byol", params, lr=0.0).load_state_dict(theirs)  # lr inside the buffer: not the same thing
