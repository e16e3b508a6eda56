"""The GPU path's correctness where the CPU can show it (issue 18): optimizer state placement,
the fp16 fallback under GradScaler, the Triton table's rebuilds, the compiled path under graphs.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors; a 'meta' device
stands in for a second device where only placement matters.
"""

from __future__ import annotations

import copy

import pytest
import torch

from largebatch.optim import LAMB, LARS

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")


@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _conv_and_bias(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter((torch.randn(8, 4, 3, 3) * 0.1).to(dtype)),
            torch.nn.Parameter((torch.randn(8) * 0.1).to(dtype))]


def _make(kind: str, params, implementation: str):
    if kind == "lars":
        return LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02,
                    implementation=implementation)
    return LAMB(params, lr=0.01, weight_decay=1e-2, implementation=implementation)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_state_saved_on_the_cpu_is_loaded_onto_the_parameters_device(kind):
    """Every state tensor a kernel dereferences (LAMB's step count included) follows the parameter."""
    params = _conv_and_bias(torch.float32)
    opt = _make(kind, params, "foreach")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    on_meta = [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in params]
    loaded = _make(kind, on_meta, "foreach")
    loaded.load_state_dict(saved)
    for p in on_meta:
        for name, value in loaded.state[p].items():
            assert value.device == p.device, f"state[{name!r}] stayed on {value.device}"


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_fp16_state_laid_out_unlike_the_parameter_is_unscaled_and_skipped(kind, interpreter, seed):
    """channels_last switched on resume: the loaded buffers are contiguous, the parameter and its
    gradient channels_last, so the conv weight takes the single-tensor fallback. GradScaler has been
    told the optimizer unscales and skips by itself: the fallback must too."""
    torch.manual_seed(seed)
    params = _conv_and_bias(torch.float16)
    opt = _make(kind, params, "triton")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    saved = opt.state_dict()
    for p in params:  # the resumed run uses channels_last
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
    resumed = _make(kind, params, "triton")
    resumed.load_state_dict(saved)
    reference = _make(kind, [torch.nn.Parameter(p.detach().clone()) for p in params], "foreach")
    reference.load_state_dict(copy.deepcopy(saved))
    buffer = next(b for b in resumed.state[params[0]].values() if b.dim() == 4)
    assert buffer.stride() != params[0].stride()  # the case under test

    scale = 1024.0
    grads = [torch.randn_like(p) for p in params]
    # an overflow step: nothing may change, nothing may become inf
    before = [p.detach().clone() for p in params], copy.deepcopy(resumed.state_dict()["state"])
    for p, g in zip(params, grads, strict=True):
        p.grad = g * scale
    params[0].grad[0, 0, 0, 0] = float("inf")
    resumed.grad_scale = torch.tensor(scale)
    resumed.found_inf = torch.tensor(1.0)
    resumed.step()
    for p, old in zip(params, before[0], strict=True):
        assert torch.equal(p.detach(), old)
    for i, st in resumed.state_dict()["state"].items():
        for name, value in st.items():
            assert torch.equal(value, before[1][i][name]), f"state {i}.{name} changed on a skipped step"

    # a finite step: the scaled gradients give the update of the unscaled ones
    for p, g in zip(params, grads, strict=True):
        p.grad = g * scale
    resumed.found_inf = torch.tensor(0.0)
    resumed.step()
    for p, g in zip(reference.param_groups[0]["params"], grads, strict=True):
        p.grad = g.clone()
    reference.step()
    for a, b in zip(params, reference.param_groups[0]["params"], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=2e-3, atol=2e-4)
