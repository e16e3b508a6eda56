"""LARS, layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017; You et al., ICPP 2018).

The update is the one released in Intel Caffe 1.0.7, per parameter tensor w with gradient g:

    r  = eta * ||w|| / (||g|| + b * ||w|| + e)      (r = 1 when ||w|| = 0 or ||g|| = 0)
    v <- m * v + lr * r * (g + b * w)
    w <- w - v

The rate sits inside the momentum buffer (as in the paper and TensorFlow, unlike torch's SGD),
so a change of lr during warm-up or decay affects only new contributions. Norms are taken on the
raw gradient, before weight decay. With ``clip=True`` (LARC's clip mode) the effective rate
lr * r is capped at lr. Four interchangeable paths compute the same update: one tensor at a
time, multi-tensor (``torch._foreach_*``), compiled (one ``torch.compile`` kernel per tensor,
7 memory passes instead of 13), and Triton (two launches for all the tensors of a group, 7
memory passes, trust ratios on the device). None of them reads a value back to the host or
writes into ``p.grad``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from largebatch.optim import _triton
from largebatch.optim._common import (
    IMPLEMENTATIONS,
    accumulation_dtype,
    amp_scaling_supported,
    check_implementation,
    check_lr,
    check_nonnegative,
    chosen_implementation,
    collect_grads,
    group_by_device_and_dtype,
    load_keeping_path_choice,
    safe_ratio,
    tensor_norm,
    tensor_norms,
)

__all__ = ["LARS", "lars_trust_ratio"]


def lars_trust_ratio(
    w_norm: Tensor, g_norm: Tensor, trust_coefficient: float | Tensor, weight_decay: float | Tensor,
    eps: float | Tensor,
) -> Tensor:
    """r = eta*||w|| / (||g|| + b*||w|| + e), and 1 where either norm is zero."""
    return safe_ratio(
        trust_coefficient * w_norm, g_norm + weight_decay * w_norm + eps, w_norm, g_norm
    )


class LARS(Optimizer):
    """Stochastic gradient descent with layer-wise adaptive rate scaling.

    Args:
        params: parameters or parameter groups (see :func:`largebatch.optim.param_groups`).
            Per group, ``lars_adapt=False`` forces r = 1 and ``weight_decay`` sets b.
        lr: global learning rate (float or 0-dim tensor), usually set each step by a schedule.
        momentum: m. ``0`` keeps no buffer.
        weight_decay: b, added to the gradient and to the ratio's denominator.
        trust_coefficient: eta (0.001 in the paper's AlexNet-BN recipe).
        eps: e, added to the denominator (0 in the paper).
        nesterov: Nesterov momentum, w <- w - (lr*r*d + m*v) with d = g + b*w.
        clip: LARC clip mode, effective rate min(lr*r, lr).
        implementation: which path computes the update (all give the same result):

            - ``"auto"`` (default): ``"triton"`` for CUDA tensors when triton is installed,
              else ``"foreach"``. On the CPU ``"foreach"`` is the choice because its first
              step costs nothing, where ``"compiled"``, the fastest CPU step (21.7 ms
              against 33.3 ms for ResNet-50 on 2 threads), first pays an 11.3 s compile
              (docs/benchmarks/optimizer_step.md);
            - ``"triton"``: two kernel launches per group and dtype whatever the number of
              tensors (fp32, bf16, fp16). Refused with a clear error where it cannot run
              (no triton; CPU tensors without ``TRITON_INTERPRET=1``), never replaced;
            - ``"foreach"``: ``torch._foreach_*``, one launch per operation;
            - ``"compiled"``: one ``torch.compile`` kernel per tensor (a compile on the first step);
            - ``"single"``: the formula, one tensor at a time.
        foreach: torch-style switch, kept for compatibility: True = ``"foreach"``,
            False = ``"single"``.
        fused: torch-style switch, kept for compatibility: True = ``"compiled"``.

    Under ``torch.amp.GradScaler`` use ``scaler.step(optimizer)``: the ratio is computed on
    unscaled gradients and does not depend on the loss scale. On the Triton path the kernels
    unscale and skip a step with inf/NaN gradients on the device (no separate unscale pass, no
    host read of the inf flag); the other paths let the scaler unscale first.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 0.0,
        nesterov: bool = False,
        clip: bool = False,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        implementation: str = "auto",
    ) -> None:
        check_lr(lr)
        check_nonnegative("momentum", momentum)
        check_nonnegative("weight_decay", weight_decay)
        check_nonnegative("eps", eps)
        if not trust_coefficient > 0.0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            clip=clip,
            lars_adapt=True,
            foreach=foreach,
            fused=fused,
            implementation=implementation,
        )
        super().__init__(params, defaults)
        self._aliases: dict[Tensor, Tensor] = {}  # compiled path: flat aliases of params and buffers
        self._tables: dict[Any, Any] = {}  # Triton path: packed address tables
        for group in self.param_groups:
            check_lr(group["lr"])
            check_nonnegative("weight_decay", group["weight_decay"])
            check_implementation(group, IMPLEMENTATIONS, "LARS")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that the path (``implementation``, ``foreach``, ``fused``) stays the
        one this optimizer was built with: the saved state is the same on every path."""
        load_keeping_path_choice(self, super().load_state_dict, state_dict)
        self._aliases = {}
        self._tables = {}

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by torch.amp.GradScaler: True when the Triton kernels unscale and skip themselves."""
        return amp_scaling_supported(self.param_groups)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._aliases = {}
        self._tables = {}
        for group in self.param_groups:
            group.setdefault("lars_adapt", True)
            group.setdefault("clip", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("implementation", "auto")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Apply one LARS update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            has_momentum = group["momentum"] != 0
            params, grads, buffers = collect_grads(
                group, self.state, ("momentum_buffer",) if has_momentum else ()
            )
            if not params:
                continue
            bufs = [b[0] for b in buffers] if has_momentum else None
            extra: dict[str, Any] = {}
            implementation = chosen_implementation(group, params[0].device)
            if implementation == "triton":
                update = _triton_lars
                extra = {"tables": self._tables, "group_index": index,
                         "explicit": group.get("implementation") == "triton",
                         "grad_scale": getattr(self, "grad_scale", None),
                         "found_inf": getattr(self, "found_inf", None)}
            elif implementation == "compiled":
                update = _fused_lars
                extra = {"aliases": self._aliases}
            elif implementation == "single":
                update = _single_tensor_lars
            else:
                update = _multi_tensor_lars
            update(
                params,
                grads,
                bufs,
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                trust_coefficient=group["trust_coefficient"],
                eps=group["eps"],
                nesterov=group["nesterov"],
                clip=group["clip"],
                adapt=group["lars_adapt"],
                **extra,
            )
        return loss


def _single_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    clip: bool,
    adapt: bool,
) -> None:
    """The reference path: the formula, one tensor at a time."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        rate: float | Tensor = lr
        if adapt:
            r = lars_trust_ratio(tensor_norm(p), tensor_norm(g), trust_coefficient, weight_decay, eps)
            if clip:
                r = r.clamp(max=1.0)
            rate = r * lr
        d = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
        step = d * rate  # a new tensor: p.grad is never written
        if bufs is None:
            p.sub_(step)
            continue
        v = bufs[i]
        v.mul_(momentum).add_(step)
        if nesterov:
            p.sub_(step.add_(v, alpha=momentum))
        else:
            p.sub_(v)


def _multi_tensor_lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    clip: bool,
    adapt: bool,
) -> None:
    """The same update as ``_single_tensor_lars`` with one kernel launch per operation.

    Written as scaled accumulations (addcmul with per-tensor rate c = lr*r) so that no temporary
    the size of the model is allocated: 13 memory passes with momentum and weight decay.
    """
    lists = (params, grads) if bufs is None else (params, grads, bufs)
    for bucket in group_by_device_and_dtype(*lists):
        ps, gs = bucket[0], bucket[1]
        if adapt:
            r = lars_trust_ratio(
                tensor_norms(ps),
                tensor_norms(gs),
                trust_coefficient,
                weight_decay,
                eps,
            )
            if clip:
                r = r.clamp(max=1.0)
            c = (r * lr).to(ps[0].dtype)
        else:
            c = torch.as_tensor(lr, dtype=ps[0].dtype, device=ps[0].device).expand(len(ps))
        if bufs is None or nesterov:
            # w <- w - c*(g + b*w) [- m*v_new]: the decay as a rescaling of w, then the gradient
            if bufs is not None:
                vs = bucket[2]
                torch._foreach_mul_(vs, momentum)
                torch._foreach_addcmul_(vs, gs, list(c.unbind(0)))
                torch._foreach_addcmul_(vs, ps, list((c * weight_decay).unbind(0)))
            if weight_decay != 0:
                torch._foreach_mul_(ps, list((1 - c * weight_decay).unbind(0)))
            torch._foreach_addcmul_(ps, gs, list((-c).unbind(0)))
            if bufs is not None:
                torch._foreach_add_(ps, bucket[2], alpha=-momentum)
            continue
        vs = bucket[2]
        torch._foreach_mul_(vs, momentum)
        torch._foreach_addcmul_(vs, gs, list(c.unbind(0)))
        if weight_decay != 0:
            torch._foreach_addcmul_(vs, ps, list((c * weight_decay).unbind(0)))
        torch._foreach_sub_(ps, vs)


def _triton_lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor] | None,
    *,
    tables: dict[Any, Any],
    group_index: int,
    explicit: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    **options: Any,
) -> None:
    """Triton kernels per (device, dtype) bucket; a dtype they lack is refused if asked for by name."""
    lists = (params, grads) if bufs is None else (params, grads, bufs)
    for bucket in group_by_device_and_dtype(*lists):
        ps, gs = bucket[0], bucket[1]
        vs = bucket[2] if bufs is not None else None
        _triton.check_usable(ps[0].device, "LARS")  # e.g. moved to the CPU after construction
        if ps[0].dtype not in _triton.SUPPORTED_DTYPES:
            if explicit:
                raise TypeError(f"LARS(implementation='triton') supports float32, bfloat16 and float16 "
                                f"parameters, not {ps[0].dtype}")
            _multi_tensor_lars(ps, gs, vs, **options)
            continue
        prepared = _triton.prepare(tables, (group_index, ps[0].device, ps[0].dtype), list(bucket), len(bucket))
        odd = prepared.odd
        if odd:  # not dense, or laid out unlike its gradient: rare, and correct one at a time
            odd_ps, odd_vs = _triton.take(ps, odd), None if vs is None else _triton.take(vs, odd)
            _triton.single_under_scaler(  # unscaled and skipped as the kernels do (GradScaler relies on it)
                functools.partial(_single_tensor_lars, odd_ps, bufs=odd_vs, **options),
                _triton.take(gs, odd), odd_ps + (odd_vs or []), grad_scale, found_inf)
        if prepared.table is not None:
            _triton.lars_step(prepared.table, has_momentum=vs is not None, grad_scale=grad_scale,
                              found_inf=found_inf, **options)


# ---------------------------------------------------------------------------------------------
# Compiled path: one compiled kernel per tensor. Hyper-parameters travel as a tensor and tensors as
# flat aliases of their storage, so one graph (dynamic in the length) serves every group, shape
# and step: [lr, m, b, eta, e, adapt, clip, nesterov].


def _fused_rate(p: Tensor, g: Tensor, hyper: Tensor) -> tuple[Tensor, ...]:
    lr, momentum, wd, eta, eps, adapt, clip, nesterov = hyper.unbind(0)
    w_norm = torch.linalg.vector_norm(p, dtype=hyper.dtype)
    g_norm = torch.linalg.vector_norm(g, dtype=hyper.dtype)
    r = lars_trust_ratio(w_norm, g_norm, eta, wd, eps)  # hyper-parameters as tensors: one graph
    r = torch.where(clip > 0, r.clamp(max=1.0), r)
    r = torch.where(adapt > 0, r, torch.ones_like(r))
    step = ((lr * r) * (g.to(hyper.dtype) + wd * p.to(hyper.dtype))).to(p.dtype)
    return step, momentum.to(p.dtype), nesterov


def _fused_with_momentum(p: Tensor, g: Tensor, v: Tensor, hyper: Tensor) -> None:
    step, momentum, nesterov = _fused_rate(p, g, hyper)
    new_v = momentum * v + step
    v.copy_(new_v)
    p.sub_(torch.where(nesterov > 0, step + momentum * new_v, new_v))


def _fused_without_momentum(p: Tensor, g: Tensor, hyper: Tensor) -> None:
    step, _, _ = _fused_rate(p, g, hyper)
    p.sub_(step)


_kernels: dict[tuple[str, torch.device, torch.dtype], Callable[..., None]] = {}
_SIZE_HINT = 1 << 20  # elements: the first trace's size decides whether inductor emits parallel loops


def _kernel(with_momentum: bool, device: torch.device, dtype: torch.dtype) -> Callable[..., None]:
    """Compiled lazily, once per process and kind of tensor; dynamic in the tensor length.

    The first call traces a scratch tensor of ``_SIZE_HINT`` elements: traced on a small layer,
    inductor would emit single-threaded loops and use them for the large layers too.
    """
    key = ("momentum" if with_momentum else "plain", device, dtype)
    if key not in _kernels:
        body = _fused_with_momentum if with_momentum else _fused_without_momentum
        kernel = torch.compile(body, dynamic=True)
        acc = accumulation_dtype(dtype)
        scratch = [torch.zeros(_SIZE_HINT, dtype=dtype, device=device) for _ in range(2 + with_momentum)]
        kernel(*scratch, torch.zeros(8, dtype=acc, device=device))
        _kernels[key] = kernel
    return _kernels[key]


def _flat_alias(t: Tensor) -> Tensor | None:
    """A 1-D tensor over the same memory as a dense t (contiguous or permuted, e.g. channels_last).

    It is a fresh tensor on t's storage rather than a view, so the compiled graph does not
    specialise on the shape of the original. None when t is not dense.
    """
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    if not t.permute(order).is_contiguous():
        return None
    flat = torch.empty(0, dtype=t.dtype, device=t.device)
    return flat.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def _cached_alias(t: Tensor, aliases: dict[Tensor, Tensor] | None) -> Tensor | None:
    """The flat alias of a long-lived tensor (parameter, buffer), rebuilt if its memory moved."""
    if aliases is None:
        return _flat_alias(t)
    alias = aliases.get(t)
    if alias is None or alias.data_ptr() != t.data_ptr() or alias.numel() != t.numel():
        alias = _flat_alias(t)
        if alias is not None:
            aliases[t] = alias
    return alias


def _fused_lars(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    nesterov: bool,
    clip: bool,
    adapt: bool,
    aliases: dict[Tensor, Tensor] | None = None,
) -> None:
    options = dict(momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                   eps=eps, nesterov=nesterov, clip=clip, adapt=adapt)
    hypers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        tensors = (p, g) if bufs is None else (p, g, bufs[i])
        flats = [_cached_alias(t, aliases) if t is not g else _flat_alias(t) for t in tensors]
        if any(f is None for f in flats) or any(t.stride() != p.stride() for t in tensors):
            _single_tensor_lars([p], [g], None if bufs is None else [bufs[i]], lr=lr, **options)
            continue
        acc = accumulation_dtype(p.dtype)
        key = (p.device, acc)
        if key not in hypers:
            hypers[key] = _hyper_tensor(lr, options, p.device, acc)
        _kernel(bufs is not None, p.device, p.dtype)(*flats, hypers[key])


def _hyper_tensor(lr: float | Tensor, options: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Tensor:
    """The fused kernel's hyper-parameters on the parameters' device, built without a host sync."""
    names = ("momentum", "weight_decay", "trust_coefficient", "eps", "adapt", "clip", "nesterov")
    rest = torch.tensor([float(options[n]) for n in names], dtype=dtype).to(device, non_blocking=True)
    if isinstance(lr, Tensor):
        lr_t = lr.to(device=device, dtype=dtype).reshape(1)
    else:
        lr_t = torch.full((1,), lr, dtype=dtype, device=device)
    return torch.cat([lr_t, rest])
