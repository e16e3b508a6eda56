"""Triton kernels for LARS and LAMB over a packed table of tensors (imported only when used).

Each parameter tensor is one row of an int64 table: the addresses of its parameter, gradient
and state buffers, its length, and the range of "chunks" (fixed-size slices) it was split into.
One program handles one chunk, so a large tensor spreads over many programs and two thousand
small ones cost two thousand programs, not two thousand launches. Per-chunk sums of squares go
to a scratch vector; the update kernel adds up its tensor's chunks itself (a deterministic second
reduction, no atomics), so trust ratios never leave the device. With ``VEC > 1`` (every address
16-byte aligned and every length a multiple of VEC, checked on the host) the compiler is told
so, and loads and stores move 128 bits at a time.

The functions are plain Python until :func:`compiled` hands them to ``triton.jit``, which reads
``TRITON_INTERPRET`` at that moment: the same source runs compiled on a GPU or interpreted on CPU
tensors. The kernels share a few helpers (the ``_``-prefixed functions below), jitted the same way
and bound into each kernel's globals for that mode, so a compiled kernel inlines them.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable

import triton
import triton.language as tl

__all__ = ["compiled", "interpreting", "lamb_moments", "lamb_update", "lars_norms", "lars_update"]

# tl.sum is tl.reduce with this combine function. Reducing with it directly is the same kernel
# when compiled, and lets the interpreter use numpy's sum instead of interpreting a function call.
_sum_combine = getattr(tl.standard, "_sum_combine", None)
if _sum_combine is None:  # pragma: no cover - a triton without it

    def _add(a, b):
        return a + b

    _sum_combine = triton.jit(_add)

# A table row: the addresses (LARS: param, grad[, momentum_buffer]; LAMB: param, grad, exp_avg,
# exp_avg_sq, step), then numel, first chunk, number of chunks. NUMEL is the numel column.


def _column(row, k, DT: tl.constexpr, VEC: tl.constexpr):
    """Column k of a table row as a DT pointer; 16-byte aligned when VEC > 1 (checked on the host),
    which lets loads and stores move 128 bits."""
    ptr = tl.load(row + k).to(tl.pointer_type(DT))
    if VEC > 1:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


def _chunk_range(table, chunks, pid, ROW: tl.constexpr, NUMEL: tl.constexpr, VEC: tl.constexpr,
                 CHUNK: tl.constexpr):
    """Chunk pid's table row and its [start, end) in that tensor."""
    t = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    row = table + t * ROW
    end = tl.minimum(start + CHUNK, tl.load(row + NUMEL))
    if VEC > 1:  # every address 16-byte aligned, every length a multiple of VEC
        start = tl.multiple_of(start, VEC)
        end = tl.multiple_of(end, VEC)
    return row, start, end


def _end_unless_inf(start, end, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """end, or start when inf/NaN gradients were found somewhere: an empty range, nothing is written."""
    if HAS_FOUND_INF:
        end = tl.where(tl.load(found_inf_ptr).to(tl.float32) == 0.0, end, start)
    return end


def _rate(lr_ptr, lr, LR_IS_TENSOR: tl.constexpr):
    """The learning rate: the float argument, or read on the device from a tensor."""
    rate = lr
    if LR_IS_TENSOR:
        rate = tl.load(lr_ptr).to(tl.float32)
    return rate


def _tensor_norms(row, partial_a, partial_b, NUMEL: tl.constexpr, PBLOCK: tl.constexpr):
    """The square roots of a tensor's two per-chunk sums: the second, fixed-order reduction."""
    first = tl.load(row + NUMEL + 1)
    count = tl.load(row + NUMEL + 2)
    sa = tl.full([PBLOCK], 0.0, tl.float32)
    sb = tl.full([PBLOCK], 0.0, tl.float32)
    for c in range(0, count, PBLOCK):
        cidx = c + tl.arange(0, PBLOCK)
        cmask = cidx < count
        sa += tl.load(partial_a + first + cidx, mask=cmask, other=0.0)
        sb += tl.load(partial_b + first + cidx, mask=cmask, other=0.0)
    return tl.sqrt(tl.reduce(sa, 0, _sum_combine)), tl.sqrt(tl.reduce(sb, 0, _sum_combine))


def _bias_corrections(row, log2_beta1, log2_beta2):
    """1 - beta**step for both moments, in float32 whatever the tensor's dtype (in bf16, 0.999 rounds to 1)."""
    step = tl.load(tl.load(row + 4).to(tl.pointer_type(tl.float32)))
    return 1.0 - tl.exp2(step * log2_beta1), 1.0 - tl.exp2(step * log2_beta2)


def lars_norms(table, chunks, partial_w, partial_g, ROW: tl.constexpr, NUMEL: tl.constexpr,
               DT: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Sums of squares of w and g over one chunk."""
    pid = tl.program_id(0)
    row, start, end = _chunk_range(table, chunks, pid, ROW, NUMEL, VEC, CHUNK)
    w_ptr = _column(row, 0, DT, VEC)
    g_ptr = _column(row, 1, DT, VEC)
    acc_w = tl.full([BLOCK], 0.0, tl.float32)
    acc_g = tl.full([BLOCK], 0.0, tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        acc_w += w * w
        acc_g += g * g
    tl.store(partial_w + pid, tl.reduce(acc_w, 0, _sum_combine))
    tl.store(partial_g + pid, tl.reduce(acc_g, 0, _sum_combine))


def lars_update(table, chunks, partial_w, partial_g, lr_ptr, lr, scale_ptr, found_inf_ptr,
                momentum, weight_decay, eta, eps,
                ROW: tl.constexpr, NUMEL: tl.constexpr, DT: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, PBLOCK: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
                NESTEROV: tl.constexpr, ADAPT: tl.constexpr, CLIP: tl.constexpr,
                LR_IS_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """The trust ratio from the tensor's chunk sums, then v <- m*v + lr*r*(g + b*w); w <- w - v."""
    pid = tl.program_id(0)
    row, start, end = _chunk_range(table, chunks, pid, ROW, NUMEL, VEC, CHUNK)
    w_ptr = _column(row, 0, DT, VEC)
    g_ptr = _column(row, 1, DT, VEC)
    v_ptr = w_ptr
    if HAS_MOMENTUM:
        v_ptr = _column(row, 2, DT, VEC)
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(scale_ptr).to(tl.float32)
    end = _end_unless_inf(start, end, found_inf_ptr, HAS_FOUND_INF)
    rate = _rate(lr_ptr, lr, LR_IS_TENSOR)
    if ADAPT:
        w_norm, g_norm = _tensor_norms(row, partial_w, partial_g, NUMEL, PBLOCK)
        g_norm = g_norm * inv_scale
        ratio = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
        ratio = tl.where((w_norm > 0.0) & (g_norm > 0.0), ratio, 1.0)
        if CLIP:
            ratio = tl.minimum(ratio, 1.0)
        rate = rate * ratio

    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * inv_scale
        u = rate * (g + weight_decay * w)
        if HAS_MOMENTUM:
            v = momentum * tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32) + u
            tl.store(v_ptr + idx, v.to(DT), mask=mask)
            if NESTEROV:
                w = w - (u + momentum * v)
            else:
                w = w - v
        else:
            w = w - u
        tl.store(w_ptr + idx, w.to(DT), mask=mask)


def lamb_moments(table, chunks, partial_w, partial_u, scale_ptr, found_inf_ptr,
                 beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
                 ROW: tl.constexpr, NUMEL: tl.constexpr, DT: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """m, v updated in place; sums of squares of w and of the direction u over one chunk."""
    pid = tl.program_id(0)
    row, start, end = _chunk_range(table, chunks, pid, ROW, NUMEL, VEC, CHUNK)
    w_ptr = _column(row, 0, DT, VEC)
    g_ptr = _column(row, 1, DT, VEC)
    m_ptr = _column(row, 2, DT, VEC)
    v_ptr = _column(row, 3, DT, VEC)
    bias1, bias2 = _bias_corrections(row, log2_beta1, log2_beta2)
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(scale_ptr).to(tl.float32)
    end = _end_unless_inf(start, end, found_inf_ptr, HAS_FOUND_INF)
    acc_w = tl.full([BLOCK], 0.0, tl.float32)
    acc_u = tl.full([BLOCK], 0.0, tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * inv_scale
        m = beta1 * tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta1) * g
        v = beta2 * tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32) + (1.0 - beta2) * g * g
        m = m.to(DT)
        v = v.to(DT)
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        # the direction from the stored (rounded) moments: lamb_update recomputes the same value
        u = (m.to(tl.float32) / bias1) / (tl.sqrt(v.to(tl.float32) / bias2) + eps) + weight_decay * w
        u = tl.where(mask, u, 0.0)
        acc_w += w * w
        acc_u += u * u
    tl.store(partial_w + pid, tl.reduce(acc_w, 0, _sum_combine))
    tl.store(partial_u + pid, tl.reduce(acc_u, 0, _sum_combine))


def lamb_update(table, chunks, partial_w, partial_u, lr_ptr, lr, found_inf_ptr,
                log2_beta1, log2_beta2, eps, weight_decay,
                ROW: tl.constexpr, NUMEL: tl.constexpr, DT: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK: tl.constexpr, PBLOCK: tl.constexpr, ADAPT: tl.constexpr,
                LR_IS_TENSOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """r = ||w|| / ||u|| from the tensor's chunk sums, then w <- w - lr*r*u."""
    pid = tl.program_id(0)
    row, start, end = _chunk_range(table, chunks, pid, ROW, NUMEL, VEC, CHUNK)
    w_ptr = _column(row, 0, DT, VEC)
    m_ptr = _column(row, 2, DT, VEC)
    v_ptr = _column(row, 3, DT, VEC)
    bias1, bias2 = _bias_corrections(row, log2_beta1, log2_beta2)
    end = _end_unless_inf(start, end, found_inf_ptr, HAS_FOUND_INF)
    rate = _rate(lr_ptr, lr, LR_IS_TENSOR)
    if ADAPT:
        w_norm, u_norm = _tensor_norms(row, partial_w, partial_u, NUMEL, PBLOCK)
        ratio = tl.where((w_norm > 0.0) & (u_norm > 0.0), w_norm / u_norm, 1.0)
        rate = rate * ratio
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        mask = idx < end
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        u = (m / bias1) / (tl.sqrt(v / bias2) + eps) + weight_decay * w
        tl.store(w_ptr + idx, (w - rate * u).to(DT), mask=mask)


_SOURCES: dict[str, Callable[..., None]] = {
    "lars_norms": lars_norms,
    "lars_update": lars_update,
    "lamb_moments": lamb_moments,
    "lamb_update": lamb_update,
}
_HELPERS = (_column, _chunk_range, _end_unless_inf, _rate, _tensor_norms, _bias_corrections)
_compiled: dict[tuple[str, bool], object] = {}
_scopes: dict[bool, dict[str, object]] = {}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compiled(name: str):
    """The kernel ``name`` as a Triton function, jitted once per process and interpreter mode."""
    key = (name, interpreting())
    if key not in _compiled:
        _compiled[key] = triton.jit(_rebound(_SOURCES[name], _scope(key[1])))
    return _compiled[key]


def _scope(interpret: bool) -> dict[str, object]:
    """This module's globals with the helpers jitted for one mode: a compiled kernel must call
    JIT functions and an interpreted one interpreted functions, under the same names."""
    if interpret not in _scopes:
        scope = dict(globals())
        for helper in _HELPERS:
            scope[helper.__name__] = triton.jit(_rebound(helper, scope))
        _scopes[interpret] = scope
    return _scopes[interpret]


def _rebound(fn: Callable[..., object], scope: dict[str, object]) -> Callable[..., object]:
    """fn, same code, looking its globals up in scope."""
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__annotations__ = fn.__annotations__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    return copy
