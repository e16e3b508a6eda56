"""The Triton multi-tensor path of LARS and LAMB against the float64 references.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, set for each test here) runs the kernels on
CPU tensors: the same kernel source a GPU compiles is checked on every option set and on
awkward tables of tensors. The kernels are jitted on first use, when the variable is read, and
call no jitted helper, so the interpreter works even when triton was imported before.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import lamb_step
from support.optim import LARS_CASES, NoHostSync, lars_reference_steps, run_steps

from largebatch.optim import LAMB, LARS, param_groups
from largebatch.optim import _triton as triton_path
from largebatch.optim._common import chosen_implementation

triton = pytest.importorskip("triton")
# 0/0 in a ratio the kernel then replaces by 1 (zero norms): numpy warns in the interpreter
pytestmark = [pytest.mark.usefixtures("interpreter"),
              pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")]

SHAPES = [(6, 4), (9,), (5, 3, 3, 3), (7,), (3, 5)]


@pytest.mark.parametrize("case", LARS_CASES)
def test_lars_matches_float64_reference(case, seed):
    gen = torch.Generator().manual_seed(seed)
    opts = LARS_CASES[case]
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    init[1].zero_()  # ||w|| = 0 -> r = 1
    params = [torch.nn.Parameter(t.clone()) for t in init]
    groups = [
        {"params": [params[0], params[2], params[4]]},
        {"params": [params[1], params[3]], "lars_adapt": False, "weight_decay": 0.0},
    ]
    opt = LARS(groups, lr=0.1, **opts, implementation="triton")
    lrs = [0.0, 0.05, 0.4, 1.3, 0.7]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in lrs]
    grads[2][4].zero_()  # ||g|| = 0 -> r = 1
    run_steps(opt, params, grads, lrs)
    ref = lars_reference_steps(init, grads, lrs, {0: False, 2: False, 4: False, 1: True, 3: True}, opts)
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.detach().double().numpy(), ref[i], rtol=1e-5, atol=1e-6,
                                   err_msg=f"tensor {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "nesterov", "clip"])
def test_lars_low_precision_follows_the_reference(dtype, case, seed):
    """bf16/fp16 parameters, gradients and buffers: within a few units in the last place."""
    gen = torch.Generator().manual_seed(seed)
    opts = dict(LARS_CASES[case], trust_coefficient=0.05)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = LARS(params, lr=1.0, **opts, implementation="triton")
    lrs = [1.0, 2.0, 1.5]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in lrs]
    run_steps(opt, params, grads, lrs)
    ref = lars_reference_steps(init, grads, lrs, dict.fromkeys(range(len(SHAPES)), False), opts)
    for p, w0, w in zip(params, init, ref, strict=True):
        ulp = torch.finfo(dtype).eps * float(np.abs(w).max())
        assert np.abs(w - w0.double().numpy()).max() > 10 * ulp  # the step is far above rounding
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=0, atol=4 * ulp)


def _awkward(kind: str, gen: torch.Generator) -> list[torch.Tensor]:
    if kind == "one_element":
        return [torch.randn(1, generator=gen)]
    if kind == "large_odd_length":
        return [torch.randn(1_000_003, generator=gen), torch.randn(3, generator=gen)]
    if kind == "empty_tensor":
        return [torch.randn(4, 3, generator=gen), torch.empty(0), torch.randn(5, generator=gen)]
    if kind == "many_tiny":
        return [torch.randn(3, generator=gen) for _ in range(2000)]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["one_element", "large_odd_length", "empty_tensor",
                                  pytest.param("many_tiny", marks=pytest.mark.slow)])
def test_lars_awkward_tables(kind, seed):
    gen = torch.Generator().manual_seed(seed)
    opts = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, eps=0.0)
    init = _awkward(kind, gen)
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = LARS(params, lr=0.5, **opts, implementation="triton")
    lrs = [0.5] if kind in ("many_tiny", "large_odd_length") else [0.5, 0.25]  # the interpreter is slow
    grads = [[torch.randn(t.shape, generator=gen) for t in init] for _ in lrs]
    run_steps(opt, params, grads, lrs)
    ref = lars_reference_steps(init, grads, lrs, dict.fromkeys(range(len(init)), False), opts)
    for i, p in enumerate(params):
        np.testing.assert_allclose(p.detach().double().numpy(), ref[i], rtol=1e-5, atol=1e-6,
                                   err_msg=f"tensor {i}")


def test_lars_zero_norms_and_mixed_dtypes_in_one_group(seed):
    gen = torch.Generator().manual_seed(seed)
    opts = dict(momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02, eps=0.0)
    init = [torch.zeros(4, 4), torch.randn(8, generator=gen), torch.randn(3, 3, generator=gen).bfloat16(),
            torch.randn(5, generator=gen).bfloat16()]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = LARS(params, lr=0.5, **opts, implementation="triton")
    grads = [[torch.randn(t.shape, generator=gen).to(t.dtype) for t in init]]
    grads[0][1].zero_()  # ||g|| = 0
    run_steps(opt, params, grads, [0.5])
    ref = lars_reference_steps(init, grads, [0.5], dict.fromkeys(range(4), False), opts)
    for p, w in zip(params, ref, strict=True):
        atol = 1e-6 if p.dtype == torch.float32 else 4 * 2.0**-8 * float(np.abs(w).max())
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=1e-5, atol=atol)


def test_lars_odd_layouts_take_the_single_tensor_path_with_the_same_result(seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=gen)
    w = torch.randn(8, 3, 3, 3, generator=gen)
    runs = []
    for implementation in ("foreach", "triton"):
        strided = torch.nn.Parameter(base.clone()[:, ::2])  # not dense: the single-tensor path
        channels_last = torch.nn.Parameter(w.clone().contiguous(memory_format=torch.channels_last))
        transposed = torch.nn.Parameter(base.clone().t())  # dense, permuted: the kernels
        params = [strided, channels_last, transposed]
        opt = LARS(params, lr=0.5, weight_decay=1e-3, trust_coefficient=0.02, implementation=implementation)
        g2 = torch.Generator().manual_seed(seed + 1)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g2).contiguous(
                    memory_format=torch.channels_last if p.ndim == 4 else torch.contiguous_format)
                if p is transposed:
                    p.grad = p.grad.t().contiguous().t()  # laid out as the parameter
            opt.step()
        assert channels_last.is_contiguous(memory_format=torch.channels_last)
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lr_as_a_tensor_equals_lr_as_a_float(seed):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(2)]
    out = []
    for lr in (0.25, torch.tensor(0.25)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = LARS(params, lr=lr, weight_decay=1e-3, implementation="triton")
        run_steps(opt, params, grads, [lr, lr])
        out.append(params)
    for a, b in zip(*out, strict=True):
        assert torch.equal(a, b)


def test_step_never_writes_grad_and_state_dict_is_the_foreach_one(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    data = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(6)]

    def train(m, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            grads = [p.grad.clone() for p in m.parameters()]
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(m.parameters(), grads, strict=True))

    straight = copy.deepcopy(model)
    train(straight, LARS(param_groups(straight, 1e-3), lr=0.5, implementation="foreach"), data)
    # three steps on the Triton path, then resume on the foreach path from its state_dict
    first = copy.deepcopy(model)
    opt1 = LARS(param_groups(first, 1e-3), lr=0.5, implementation="triton")
    train(first, opt1, data[:3])
    saved = copy.deepcopy(opt1.state_dict())
    opt2 = LARS(param_groups(first, 1e-3), lr=0.5, implementation="foreach")
    opt2.load_state_dict(saved)
    assert all(g["implementation"] == "foreach" for g in opt2.param_groups)  # this process's choice
    train(first, opt2, data[3:])
    assert {k for s in opt1.state.values() for k in s} == {"momentum_buffer"}
    for a, b in zip(straight.parameters(), first.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_grad_scaler_unscales_in_the_kernel_and_skips_inf_steps(optimizer, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    batches = [(torch.randn(32, 10), torch.randint(0, 4, (32,))) for _ in range(4)]

    def make(m, implementation):
        if optimizer == "lars":
            return LARS(param_groups(m, 5e-4), lr=2.0, trust_coefficient=0.01, implementation=implementation)
        return LAMB(param_groups(m, 5e-4), lr=0.01, implementation=implementation)

    finals = []
    for implementation, scale in (("foreach", 1.0), ("triton", 2.0**14)):
        m = copy.deepcopy(model)
        opt = make(m, implementation)
        assert opt._step_supports_amp_scaling == (implementation == "triton")
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x), y)
            if step == 2:
                loss = loss * float("inf")  # this step must change nothing
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        finals.append(([p.detach().clone() for p in m.parameters()], opt))
    (a, _), (b, opt_b) = finals
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    if optimizer == "lamb":  # the skipped step is not counted
        assert all(float(s["step"]) == 3.0 for s in opt_b.state.values())


@pytest.mark.parametrize("weight_decay", [0.0, 0.02])
def test_lamb_matches_float64_reference(weight_decay, seed):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    init[1].zero_()
    params = [torch.nn.Parameter(t.clone()) for t in init]
    groups = [{"params": [params[0], params[2], params[4]]},
              {"params": [params[1], params[3]], "lars_adapt": False}]
    opt = LAMB(groups, lr=0.01, betas=(0.9, 0.99), eps=1e-6, weight_decay=weight_decay,
               implementation="triton")
    ref = [(t.double().numpy(), np.zeros(t.shape), np.zeros(t.shape)) for t in init]
    for t, lr in enumerate([0.01, 0.02, 0.005, 0.03], start=1):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        run_steps(opt, params, [grads], [lr])
        ref = [lamb_step(w, g.double().numpy(), m, v, t, lr=lr, beta1=0.9, beta2=0.99, eps=1e-6,
                         weight_decay=weight_decay, adapt=i not in (1, 3))
               for i, ((w, m, v), g) in enumerate(zip(ref, grads, strict=True))]
    for p, (w, _, _) in zip(params, ref, strict=True):
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lamb_low_precision_params_move_as_the_reference(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    init = [(0.5 * torch.randn(s, generator=gen)).to(dtype) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = LAMB(params, lr=0.1, weight_decay=0.01, implementation="triton")
    ref = [(t.double().numpy(), np.zeros(t.shape), np.zeros(t.shape)) for t in init]
    for t in range(1, 4):
        raw = [torch.randn(s, generator=gen) for s in SHAPES]
        grads = [(r.sign() * (0.5 + r.abs())).to(dtype) for r in raw]  # no fp16 underflow of g^2/1000
        run_steps(opt, params, [grads], [0.1])
        ref = [lamb_step(w, g.double().numpy(), m, v, t, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-6,
                         weight_decay=0.01) for (w, m, v), g in zip(ref, grads, strict=True)]
    for p, w0, (w, _, _) in zip(params, init, ref, strict=True):
        ulp = torch.finfo(dtype).eps * float(np.abs(w).max())
        assert np.abs(w - w0.double().numpy()).max() > 10 * ulp
        np.testing.assert_allclose(p.detach().double().numpy(), w, rtol=0, atol=4 * ulp)


@pytest.mark.slow
def test_lamb_many_tiny_tensors_and_an_empty_one(seed):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(3, generator=gen) for _ in range(500)] + [torch.empty(0)]
    runs = []
    for implementation in ("foreach", "triton"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = LAMB(params, lr=0.01, weight_decay=0.01, implementation=implementation)
        g2 = torch.Generator().manual_seed(seed + 1)
        run_steps(opt, params, [[torch.randn(t.shape, generator=g2) for t in init]], [0.01])
        runs.append(params)
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_default_path_follows_the_device():
    group = {"implementation": "auto", "foreach": None, "fused": None}
    assert chosen_implementation(group, torch.device("cpu")) == "foreach"
    assert chosen_implementation(group, torch.device("cuda")) == "triton"
    assert chosen_implementation(dict(group, fused=True), torch.device("cuda")) == "compiled"
    assert chosen_implementation(dict(group, foreach=False), torch.device("cuda")) == "single"
    opt = LARS([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    assert chosen_implementation(opt.param_groups[0], torch.device("cpu")) == "foreach"


def test_triton_refused_where_it_cannot_run(monkeypatch):
    p = [torch.nn.Parameter(torch.ones(3))]
    opt = LARS(p, lr=0.1, implementation="triton")  # accepted while the interpreter is on
    p[0].grad = torch.ones(3)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(triton_path.TritonUnavailable, match="needs CUDA tensors"):
        opt.step()  # refused at the step too, not failed inside the kernel launch
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(triton_path.TritonUnavailable, match=r"needs CUDA tensors .* TRITON_INTERPRET=1"):
        LARS(p, lr=0.1, implementation="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_path, "triton_installed", lambda: False)
    with pytest.raises(triton_path.TritonUnavailable, match="needs the triton package"):
        LAMB(p, lr=0.1, implementation="triton")


def test_bad_choices_are_refused_in_one_line():
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="implementation must be one of auto, triton"):
        LARS(p, lr=0.1, implementation="cuda")
    with pytest.raises(ValueError, match="implementation must be one of"):
        LAMB(p, lr=0.1, implementation="compiled")
    with pytest.raises(ValueError, match="contradicts"):
        LARS(p, lr=0.1, implementation="triton", fused=True)
    wide = [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]
    opt = LARS(wide, lr=0.1, implementation="triton")
    wide[0].grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        opt.step()


def _signature(fn, constexprs: dict, floats: tuple[str, ...]) -> dict[str, str]:
    import inspect

    integer_tables = ("table", "chunks")
    return {name: "constexpr" if name in constexprs else "fp32" if name in floats
            else "*i64" if name in integer_tables else "*fp32"
            for name in inspect.signature(fn.fn).parameters}


def test_kernels_compile_for_a_gpu_without_one(monkeypatch, tmp_path):
    """Triton compiles for sm_90 on this CPU (ptxas ships with triton): what the interpreter
    cannot see, a kernel the GPU compiler refuses, shows here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from largebatch.optim import _triton_kernels as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a real compile, not a cache hit
    tl = triton.language
    everything = dict(HAS_SCALE=True, HAS_FOUND_INF=True)
    lars_hyper = ("lr", "momentum", "weight_decay", "eta", "eps")
    lamb_hyper = ("lr", "beta1", "beta2", "log2_beta1", "log2_beta2", "eps", "weight_decay")
    jobs = [
        ("lars_norms", dict(ROW=6, NUMEL=3, DT=tl.bfloat16, VEC=8), ()),
        ("lars_update", dict(ROW=6, NUMEL=3, DT=tl.bfloat16, VEC=8, PBLOCK=64, HAS_MOMENTUM=True, NESTEROV=True,
                             ADAPT=True, CLIP=True, LR_IS_TENSOR=True, **everything), lars_hyper),
        ("lars_update", dict(ROW=5, NUMEL=2, DT=tl.float32, VEC=1, PBLOCK=64, HAS_MOMENTUM=False, NESTEROV=False,
                             ADAPT=False, CLIP=False, LR_IS_TENSOR=False, HAS_SCALE=False,
                             HAS_FOUND_INF=False), lars_hyper),
        ("lamb_moments", dict(ROW=8, NUMEL=5, DT=tl.bfloat16, VEC=8, **everything), lamb_hyper),
        ("lamb_update", dict(ROW=8, NUMEL=5, DT=tl.float32, VEC=4, PBLOCK=64, ADAPT=True, LR_IS_TENSOR=True,
                             HAS_FOUND_INF=True), lamb_hyper),
    ]
    for name, constexprs, floats in jobs:
        fn = kernels.compiled(name)
        constexprs = dict(constexprs, CHUNK=triton_path.CHUNK, BLOCK=triton_path.BLOCK)
        source = ASTSource(fn, _signature(fn, constexprs, floats), constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], name
        if constexprs["VEC"] > 1:  # 128-bit loads where the table allows them
            assert "ld.global.v4" in compiled.asm["ptx"], name


class _Launches:
    """Stands for the jitted kernels: records each launch instead of running it."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, name):
        calls = self.calls

        class Kernel:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append(name)

        return Kernel()


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_step_launches_a_fixed_number_of_kernels_without_a_host_sync(optimizer, monkeypatch, seed):
    """Two launches per group and dtype whatever the number of tensors, and no call in the
    Python around them that reads a device value back (checked on the second step, from the cache)."""
    from largebatch.optim import _triton_kernels as kernels

    launches = _Launches()
    monkeypatch.setattr(kernels, "compiled", launches)
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(300)]
    groups = [{"params": params[:200]}, {"params": params[200:], "lars_adapt": False, "weight_decay": 0.0}]
    if optimizer == "lars":
        opt = LARS(groups, lr=torch.tensor(0.1), weight_decay=1e-3, implementation="triton")
    else:
        opt = LAMB(groups, lr=torch.tensor(0.1), weight_decay=1e-3, implementation="triton")
    for p in params:
        p.grad = torch.randn(5, generator=gen)
    opt.step()
    launches.calls.clear()
    with NoHostSync():
        opt.step()
    expected = {"lars": ["lars_norms", "lars_update", "lars_update"],  # no norms where r = 1
                "lamb": ["lamb_moments", "lamb_update"] * 2}[optimizer]
    assert launches.calls == expected
