"""LARS, layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017; You et al., ICPP 2018).

The update is the one released in Intel Caffe 1.0.7, per parameter tensor w with gradient g:

    r  = eta * ||w|| / (||g|| + b * ||w|| + e)      (r = 1 when ||w|| = 0 or ||g|| = 0)
    v <- m * v + lr * r * (g + b * w)
    w <- w - v

The rate sits inside the momentum buffer (as in the paper and TensorFlow, unlike torch's SGD),
so a change of lr during warm-up or decay affects only new contributions. Norms are taken on the
raw gradient, before weight decay. With ``clip=True`` (LARC's clip mode) the effective rate
lr * r is capped at lr. Three interchangeable paths compute the same update: one tensor at a
time, multi-tensor (``torch._foreach_*``), and fused (one compiled kernel per tensor, 7 memory
passes instead of 13). None of them reads a value back to the host or writes into ``p.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from largebatch.optim._common import (
    check_lr,
    check_nonnegative,
    collect_grads,
    group_by_device_and_dtype,
    safe_ratio,
    tensor_norms,
)

__all__ = ["LARS", "lars_trust_ratio"]


def lars_trust_ratio(
    w_norm: Tensor, g_norm: Tensor, trust_coefficient: float, weight_decay: float, eps: float
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
        foreach: multi-tensor path (default: True).
        fused: one compiled kernel per tensor via ``torch.compile`` (default: False). The first
            step pays a compile of a few seconds; the result equals the other paths.

    Under ``torch.amp.GradScaler`` use ``scaler.step(optimizer)`` (or ``scaler.unscale_`` first):
    the ratio is then computed on unscaled gradients and does not depend on the loss scale.
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
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_lr(group["lr"])
            check_nonnegative("weight_decay", group["weight_decay"])

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("lars_adapt", True)
            group.setdefault("clip", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Apply one LARS update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            has_momentum = group["momentum"] != 0
            params, grads, buffers = collect_grads(
                group, self.state, ("momentum_buffer",) if has_momentum else ()
            )
            if not params:
                continue
            bufs = [b[0] for b in buffers] if has_momentum else None
            if group["fused"]:
                update = _fused_lars
            elif group["foreach"] is False:
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
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            r = lars_trust_ratio(
                torch.linalg.vector_norm(p, dtype=acc),
                torch.linalg.vector_norm(g, dtype=acc),
                trust_coefficient,
                weight_decay,
                eps,
            )
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
    """The same update as ``_single_tensor_lars`` with one kernel launch per operation."""
    lists = (params, grads) if bufs is None else (params, grads, bufs)
    for bucket in group_by_device_and_dtype(*lists):
        ps, gs = bucket[0], bucket[1]
        if adapt:
            r = lars_trust_ratio(
                tensor_norms(ps, foreach=True),
                tensor_norms(gs, foreach=True),
                trust_coefficient,
                weight_decay,
                eps,
            )
            if clip:
                r = r.clamp(max=1.0)
            rates: list[Tensor] | float | Tensor = list((r * lr).unbind(0))
        else:
            rates = lr
        if weight_decay != 0:
            d = torch._foreach_add(gs, ps, alpha=weight_decay)
            _foreach_scale_(d, rates)
        else:
            d = _foreach_scaled(gs, rates)
        if bufs is None:
            torch._foreach_sub_(ps, d)
            continue
        vs = bucket[2]
        torch._foreach_mul_(vs, momentum)
        torch._foreach_add_(vs, d)
        if nesterov:
            torch._foreach_add_(d, vs, alpha=momentum)
            torch._foreach_sub_(ps, d)
        else:
            torch._foreach_sub_(ps, vs)


def _foreach_scale_(tensors: list[Tensor], rates: list[Tensor] | float | Tensor) -> None:
    torch._foreach_mul_(tensors, rates)


def _foreach_scaled(tensors: list[Tensor], rates: list[Tensor] | float | Tensor) -> list[Tensor]:
    return list(torch._foreach_mul(tensors, rates))


# ---------------------------------------------------------------------------------------------
# Fused path: one compiled kernel per tensor. Hyper-parameters travel as a tensor so that a
# single compiled graph (dynamic in the tensor's length) serves every group and every step.


def _fused_body(p: Tensor, g: Tensor, v: Tensor | None, hyper: Tensor, nesterov: bool) -> None:
    lr, momentum, wd, eta, eps, adapt, clip = hyper.unbind(0)
    acc = hyper.dtype
    w_norm = torch.linalg.vector_norm(p, dtype=acc)
    g_norm = torch.linalg.vector_norm(g, dtype=acc)
    r = safe_ratio(eta * w_norm, g_norm + wd * w_norm + eps, w_norm, g_norm)
    r = torch.where(clip > 0, r.clamp(max=1.0), r)
    r = torch.where(adapt > 0, r, torch.ones_like(r))
    step = ((lr * r) * (g.to(acc) + wd * p.to(acc))).to(p.dtype)
    if v is None:
        p.sub_(step)
        return
    new_v = momentum.to(v.dtype) * v + step
    v.copy_(new_v)
    if nesterov:
        p.sub_(step + momentum.to(v.dtype) * new_v)
    else:
        p.sub_(new_v)


_compiled_body: Callable[..., None] | None = None


def _fused_kernel() -> Callable[..., None]:
    global _compiled_body
    if _compiled_body is None:
        _compiled_body = torch.compile(_fused_body, dynamic=True, fullgraph=True)
    return _compiled_body


def _flat(t: Tensor) -> Tensor | None:
    """A 1-D view over a dense tensor (contiguous or permuted, e.g. channels_last), else None."""
    if t.is_contiguous():
        return t.view(-1)
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


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
) -> None:
    kernel = _fused_kernel()
    hypers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        v = bufs[i] if bufs is not None else None
        same_layout = g.stride() == p.stride() and (v is None or v.stride() == p.stride())
        flat = [_flat(t) for t in (p, g)] + [_flat(v) if v is not None else None]
        if not same_layout or flat[0] is None or flat[1] is None or (v is not None and flat[2] is None):
            _single_tensor_lars(
                [p], [g], None if v is None else [v], lr=lr, momentum=momentum,
                weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps,
                nesterov=nesterov, clip=clip, adapt=adapt,
            )
            continue
        acc = torch.float64 if p.dtype == torch.float64 else torch.float32
        key = (p.device, acc)
        if key not in hypers:
            hypers[key] = _hyper_tensor(lr, momentum, weight_decay, trust_coefficient, eps,
                                        adapt, clip, p.device, acc)
        kernel(flat[0], flat[1], flat[2], hypers[key], nesterov)


def _hyper_tensor(
    lr: float | Tensor, momentum: float, weight_decay: float, trust_coefficient: float,
    eps: float, adapt: bool, clip: bool, device: torch.device, dtype: torch.dtype,
) -> Tensor:
    """[lr, m, b, eta, e, adapt, clip] on the parameters' device, built without a host sync."""
    rest = torch.tensor(
        [momentum, weight_decay, trust_coefficient, eps, float(adapt), float(clip)], dtype=dtype
    ).to(device, non_blocking=True)
    lr_t = lr.to(device=device, dtype=dtype).reshape(1) if isinstance(lr, Tensor) else (
        torch.full((1,), lr, dtype=dtype, device=device)
    )
    return torch.cat([lr_t, rest])
