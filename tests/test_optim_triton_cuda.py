"""The Triton kernels compiled for the real GPU against the float64 references, for every LARS
option set and both optimizers in float32, bfloat16 and float16 (test_optim_triton.py checks the
same source in Triton's CPU interpreter). Skips without CUDA; benchmarks/gpu_check.sh runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import lamb_step
from support.optim import LARS_CASES, lars_reference_steps, run_steps

from largebatch.optim import LAMB, LARS

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]
pytest.importorskip("triton")

# aligned and odd lengths (two tables), a tensor over many chunks, a zero-size one
SHAPES = [(64, 3, 3, 3), (10,), (300, 257), (128,), (0,), (7, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tolerance(dtype: torch.dtype, w: np.ndarray) -> dict:
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-6}
    return {"rtol": 0, "atol": 4 * torch.finfo(dtype).eps * float(np.abs(w).max(initial=1.0))}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(LARS_CASES))
def test_lars_on_the_gpu_matches_float64(case, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    opts = LARS_CASES[case]
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone().cuda()) for t in init]
    opt = LARS(params, lr=1.0, **opts, implementation="triton")
    lrs = [0.5, 1.0, 0.25]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in lrs]
    run_steps(opt, params, grads, lrs)
    ref = lars_reference_steps(init, grads, lrs, dict.fromkeys(range(len(SHAPES)), False), opts)
    for i, (p, w) in enumerate(zip(params, ref, strict=True)):
        np.testing.assert_allclose(p.detach().cpu().double().numpy(), w, **_tolerance(dtype, w),
                                   err_msg=f"tensor {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lamb_on_the_gpu_matches_float64(weight_decay, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    init = [(0.5 * torch.randn(s, generator=gen)).to(dtype) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone().cuda()) for t in init]
    opt = LAMB(params, lr=0.05, betas=(0.9, 0.99), weight_decay=weight_decay, implementation="triton")
    ref = [(t.double().numpy(), np.zeros(t.shape), np.zeros(t.shape)) for t in init]
    for t in range(1, 4):
        raw = [torch.randn(s, generator=gen) for s in SHAPES]
        grads = [(r.sign() * (0.5 + r.abs())).to(dtype) for r in raw]  # no fp16 underflow of g^2
        run_steps(opt, params, [grads], [0.05])
        ref = [lamb_step(w, g.double().numpy(), m, v, t, lr=0.05, beta1=0.9, beta2=0.99, eps=1e-6,
                         weight_decay=weight_decay) for (w, m, v), g in zip(ref, grads, strict=True)]
    for i, (p, (w, _, _)) in enumerate(zip(params, ref, strict=True)):
        tol = _tolerance(dtype, w) if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-6}
        np.testing.assert_allclose(p.detach().cpu().double().numpy(), w, **tol, err_msg=f"tensor {i}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_on_the_second_gpu_steps_there():
    """The launches run under the tensors' device, whatever device is current."""
    torch.cuda.set_device(0)
    params = [torch.nn.Parameter(torch.randn(1000, device="cuda:1"))]
    twin = [torch.nn.Parameter(params[0].detach().clone())]
    for ps, implementation in ((params, "triton"), (twin, "foreach")):
        ps[0].grad = torch.ones_like(ps[0])
        LARS(ps, lr=0.1, trust_coefficient=0.01, implementation=implementation).step()
    torch.testing.assert_close(params[0], twin[0])
