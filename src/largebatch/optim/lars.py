"""LARS, layer-wise adaptive rate scaling (You, Gitman, Ginsburg 2017; You et al., ICPP 2018).

The update is the one released in Intel Caffe 1.0.7, per parameter tensor w with gradient g:

    r  = eta * ||w|| / (||g|| + b * ||w|| + e)      (r = 1 when ||w|| = 0 or ||g|| = 0)
    v <- m * v + lr * r * (g + b * w)
    w <- w - v

The rate sits inside the momentum buffer (as in the paper and TensorFlow, unlike torch's SGD),
so a change of lr during warm-up or decay affects only new contributions. Norms are taken on the
raw gradient, before weight decay. With ``clip=True`` the effective rate lr * r is capped at
lr (``clip="larc"`` is apex LARC's cap, min(r, lr)). Options reproduce the other published
variants (docs/optimizers.md, :mod:`largebatch.optim.variants`). Four interchangeable paths
compute the same update: one tensor at a time, multi-tensor (``torch._foreach_*``), compiled
(one ``torch.compile`` kernel per tensor, 7 memory passes instead of 13), and Triton (two
launches for all the tensors of a group, 7 memory passes, trust ratios on the device). None
of them reads a value back to the host or writes into ``p.grad``.
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
    add_checked_group,
    adopt_peer_state,
    amp_scaling_supported,
    check_implementation,
    check_loadable,
    check_lr,
    check_nonnegative,
    check_path_computes,
    check_real,
    chosen_implementation,
    collect_grads,
    group_by_device_and_dtype,
    load_keeping_path_choice,
    safe_ratio,
    tensor_norm,
    tensor_norms,
)

__all__ = ["DENOMINATORS", "LARS", "LARS_CLIPS", "ZERO_NORMS", "lars_trust_ratio"]


def lars_trust_ratio(
    w_norm: Tensor, g_norm: Tensor, trust_coefficient: float | Tensor, weight_decay: float | Tensor,
    eps: float | Tensor,
) -> Tensor:
    """r = eta*||w|| / (||g|| + b*||w|| + e), and 1 where either norm is zero."""
    return safe_ratio(
        trust_coefficient * w_norm, g_norm + weight_decay * w_norm + eps, w_norm, g_norm
    )


LARS_CLIPS = (False, True, "larc")
DENOMINATORS = ("sum", "update")
ZERO_NORMS = ("unit", "skip")


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
        clip: ``False``; ``True``: effective rate lr*min(r, 1) (ours); ``"larc"``: effective
            rate min(r, lr), apex LARC's clip (also timm's ``trust_clip``, solo-learn's
            ``clip_lars_lr``). The two differ unless lr = 1.
        dampening: torch SGD's dampening: v <- m*v + (1 - dampening)*step, except on the first
            step, where v <- step (as torch, timm, lightly and solo-learn do).
        lr_in_momentum: ``True`` (paper, Intel Caffe, SimCLR, optax): v <- m*v + lr*r*d,
            w <- w - v. ``False`` (torch SGD, timm, lightly, solo-learn, VICReg, VISSL, apex
            LARC): v <- m*v + r*d, w <- w - lr*v. The two differ whenever lr changes.
        denominator: ``"sum"``: r = eta*||w|| / (||g|| + b*||w|| + e) (paper, timm, LARC);
            ``"update"``: r = eta*||w|| / (||g + b*w|| + e) (VICReg, Barlow Twins, optax,
            SimCLR, VISSL), where the zero test is on ||g + b*w||.
        zero_norm: where ||w|| or the denominator's norm is 0: ``"unit"`` takes r = 1 and keeps
            the decay (paper, timm, VICReg); ``"skip"`` applies neither ratio nor decay
            (lightly, solo-learn, apex LARC).
        adapt_without_decay: ``False`` applies the ratio only where weight_decay != 0 (timm,
            lightly): a group with b = 0 then takes lr itself.
        variant: the name of the published variant this optimizer follows (recorded in its
            state; see :func:`largebatch.optim.variant`).
        implementation: which path computes the update (all give the same result):

            - ``"auto"`` (default): ``"triton"`` for CUDA tensors when triton is installed
              and the options are ones its kernels compute, else ``"foreach"``. On the CPU
              ``"foreach"`` is the choice because its first step costs nothing, where
              ``"compiled"``, the fastest CPU step (21.7 ms against 33.3 ms for ResNet-50 on
              2 threads), first pays an 11.3 s compile (docs/benchmarks/optimizer_step.md);
            - ``"triton"``: two kernel launches per group and dtype whatever the number of
              tensors (fp32, bf16, fp16). Refused with a clear error where it cannot run
              (no triton; CPU tensors without ``TRITON_INTERPRET=1``; ``lr_in_momentum=False``,
              ``denominator="update"``, ``zero_norm="skip"``, ``clip="larc"`` or dampening),
              never replaced;
            - ``"foreach"``: ``torch._foreach_*``, one launch per operation, every option;
            - ``"compiled"``: one ``torch.compile`` kernel per tensor (a compile on the first
              step); the same options as ``"triton"``;
            - ``"single"``: the formula, one tensor at a time, every option.
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
        clip: bool | str = False,
        *,
        dampening: float = 0.0,
        lr_in_momentum: bool = True,
        denominator: str = "sum",
        zero_norm: str = "unit",
        adapt_without_decay: bool = True,
        variant: str | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        implementation: str = "auto",
    ) -> None:
        check_lr(lr)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
            clip=clip,
            dampening=dampening,
            lr_in_momentum=lr_in_momentum,
            denominator=denominator,
            zero_norm=zero_norm,
            adapt_without_decay=adapt_without_decay,
            variant=variant,
            lars_adapt=True,
            foreach=foreach,
            fused=fused,
            implementation=implementation,
        )
        self._aliases: dict[Tensor, Tensor] = {}  # compiled path: flat aliases of params and buffers
        self._tables: dict[Any, Any] = {}  # Triton path: packed address tables
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, with the constructor's checks (a bad group is refused and not kept)."""
        add_checked_group(self, super().add_param_group, param_group, _check_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that the path (``implementation``, ``foreach``, ``fused``) stays the
        one this optimizer was built with: the saved state is the same on every path. A state
        written by another optimizer, or with the rate on the other side of the momentum
        buffer, is refused in one line (its buffers would be misread), except the state of the
        torch-convention codebase a :func:`~largebatch.optim.variant` reproduces, which is
        converted (exactly: the buffers mean the same)."""
        if all(g["variant"] and not g["lr_in_momentum"] for g in self.param_groups):
            # torch's convention, as timm, lightly, solo-learn, VICReg, VISSL and apex LARC keep it
            state_dict = adopt_peer_state(state_dict, self.param_groups, ("trust_coefficient", "lars_adapt"),
                                          {"mu": "momentum_buffer"}) or state_dict
        check_loadable("LARS", state_dict["param_groups"], self.param_groups,
                       ("trust_coefficient", "lars_adapt"), {"lr_in_momentum": True})
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
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Apply one LARS update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            has_momentum = group["momentum"] != 0
            keep = None
            if has_momentum and group["dampening"] != 0:  # torch's rule: no dampening on the first step
                keep = [1.0 if "momentum_buffer" not in self.state[p] else 1.0 - group["dampening"]
                        for p in group["params"] if p.grad is not None]
            params, grads, buffers = collect_grads(
                group, self.state, ("momentum_buffer",) if has_momentum else ()
            )
            if not params:
                continue
            bufs = [b[0] for b in buffers] if has_momentum else None
            options: dict[str, Any] = dict(
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                trust_coefficient=group["trust_coefficient"],
                eps=group["eps"],
                nesterov=group["nesterov"],
                clip=group["clip"],
                adapt=group["lars_adapt"] and (group["weight_decay"] != 0 or group["adapt_without_decay"]),
            )
            implementation = chosen_implementation(group, params[0].device)
            if implementation in ("triton", "compiled"):
                check_path_computes(group, "LARS", implementation)
            if implementation == "triton":
                update = _triton_lars
                options.update(tables=self._tables, group_index=index,
                               explicit=group.get("implementation") == "triton",
                               grad_scale=getattr(self, "grad_scale", None),
                               found_inf=getattr(self, "found_inf", None))
            elif implementation == "compiled":
                update = _fused_lars
                options.update(aliases=self._aliases)
            else:
                update = _single_tensor_lars if implementation == "single" else _multi_tensor_lars
                options.update(lr_in_momentum=group["lr_in_momentum"], denominator=group["denominator"],
                               zero_norm=group["zero_norm"], keep=keep)
            update(params, grads, bufs, **options)
        return loss


_GROUP_DEFAULTS = dict(
    lars_adapt=True, clip=False, dampening=0.0, lr_in_momentum=True, denominator="sum", zero_norm="unit",
    adapt_without_decay=True, variant=None, foreach=None, fused=None, implementation="auto",
)


def _check_group(group: dict[str, Any]) -> None:
    """The constructor's checks, per group: each failure is one line naming the option."""
    check_real(group["params"], "LARS")
    check_lr(group["lr"])
    for name in ("momentum", "weight_decay", "eps", "dampening"):
        check_nonnegative(name, group[name])
    if not group["trust_coefficient"] > 0.0:
        raise ValueError(f"trust_coefficient must be > 0, got {group['trust_coefficient']}")
    if group["nesterov"] and group["momentum"] <= 0:
        raise ValueError("nesterov=True needs momentum > 0")
    if group["nesterov"] and group["dampening"] != 0:
        raise ValueError("nesterov=True needs dampening = 0 (as torch's SGD)")
    if not (isinstance(group["clip"], bool) or group["clip"] == "larc"):
        raise ValueError(f"clip must be False, True or 'larc'; got {group['clip']!r}")
    if group["denominator"] not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {', '.join(DENOMINATORS)}; got {group['denominator']!r}")
    if group["zero_norm"] not in ZERO_NORMS:
        raise ValueError(f"zero_norm must be one of {', '.join(ZERO_NORMS)}; got {group['zero_norm']!r}")
    check_implementation(group, IMPLEMENTATIONS, "LARS")


def _clipped(r: Tensor, clip: bool | str, lr: float | Tensor) -> Tensor:
    """min(r, 1) for ``clip=True``; for LARC's clip the factor min(r, lr)/lr (1 where lr = 0)."""
    if clip == "larc":
        return (r / lr).clamp(max=1.0)
    if clip:
        return r.clamp(max=1.0)
    return r


def _ratios(
    w_norm: Tensor, g_norm: Callable[[], Tensor], d_norm: Callable[[], Tensor], *, lr: float | Tensor,
    weight_decay: float, trust_coefficient: float, eps: float, clip: bool | str, denominator: str, zero_norm: str,
) -> tuple[Tensor, Tensor | None]:
    """(q, decay): the factor on the direction and, under ``zero_norm="skip"``, the per-tensor
    decay (b, or 0 where a norm is zero); None means b everywhere."""
    if denominator == "sum":
        other = g_norm()
        r = lars_trust_ratio(w_norm, other, trust_coefficient, weight_decay, eps)
    else:
        other = d_norm()
        r = safe_ratio(trust_coefficient * w_norm, other + eps, w_norm, other)
    if zero_norm == "unit":
        return _clipped(r, clip, lr), None
    nonzero = (w_norm > 0) & (other > 0)
    q = torch.where(nonzero, _clipped(r, clip, lr), torch.ones_like(r))
    return q, torch.where(nonzero, torch.full_like(r, weight_decay), torch.zeros_like(r))


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
    clip: bool | str,
    adapt: bool,
    lr_in_momentum: bool = True,
    denominator: str = "sum",
    zero_norm: str = "unit",
    keep: list[float] | None = None,
) -> None:
    """The reference path: the formula, one tensor at a time."""
    lr_in: float | Tensor = lr if lr_in_momentum else 1.0
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        rate: float | Tensor = lr_in
        decay: float | Tensor = weight_decay
        if adapt:
            q, skip_decay = _ratios(
                tensor_norm(p), lambda g=g: tensor_norm(g),
                lambda g=g, p=p: tensor_norm(g.add(p, alpha=weight_decay) if weight_decay != 0 else g),
                lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, clip=clip,
                denominator=denominator, zero_norm=zero_norm,
            )
            rate = q * lr_in
            if skip_decay is not None:
                decay = skip_decay.to(p.dtype)
        if isinstance(decay, Tensor):
            d = g + p * decay
        else:
            d = g.add(p, alpha=decay) if decay != 0 else g
        step = d * rate  # a new tensor: p.grad is never written
        if bufs is None:
            _sub_scaled(p, step, lr_in_momentum, lr)
            continue
        v = bufs[i]
        v.mul_(momentum).add_(step if keep is None else step * keep[i])
        if nesterov:
            _sub_scaled(p, step.add_(v, alpha=momentum), lr_in_momentum, lr)
        else:
            _sub_scaled(p, v, lr_in_momentum, lr)


def _sub_scaled(p: Tensor, x: Tensor, lr_in_momentum: bool, lr: float | Tensor) -> None:
    """p <- p - x (the rate is inside x), or p <- p - lr*x (torch's convention)."""
    if lr_in_momentum:
        p.sub_(x)
    elif isinstance(lr, Tensor):
        p.sub_(x * lr.to(device=p.device, non_blocking=True))
    else:
        p.add_(x, alpha=-lr)


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
    clip: bool | str,
    adapt: bool,
    lr_in_momentum: bool = True,
    denominator: str = "sum",
    zero_norm: str = "unit",
    keep: list[float] | None = None,
) -> None:
    """The same update as ``_single_tensor_lars`` with one kernel launch per operation.

    Written as scaled accumulations (addcmul with per-tensor rate c = lr*r) so that no temporary
    the size of the model is allocated: 13 memory passes with momentum and weight decay (the
    ``denominator="update"`` option makes one temporary, g + b*w, for its norms, then steps
    along it, for about the same number of passes).
    """
    lists: list[list[Any]] = [params, grads]
    if bufs is not None:
        lists.append(bufs)
    if keep is not None:
        lists.append(keep)
    lr_in: float | Tensor = lr if lr_in_momentum else 1.0
    for bucket in group_by_device_and_dtype(*lists):
        ps, gs = bucket[0], bucket[1]
        vs = bucket[2] if bufs is not None else None
        dtype, device = ps[0].dtype, ps[0].device
        decay: Tensor | float = weight_decay
        direction, wd = gs, weight_decay  # wd: the decay still to add to `direction`
        if adapt:
            decayed: list[list[Tensor]] = []

            def update_norms(ps=ps, gs=gs, decayed=decayed) -> Tensor:
                if weight_decay == 0:
                    return tensor_norms(gs)
                decayed.append(torch._foreach_add(gs, ps, alpha=weight_decay))
                return tensor_norms(decayed[0])

            q, skip_decay = _ratios(
                tensor_norms(ps), lambda gs=gs: tensor_norms(gs), update_norms,
                lr=lr, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps, clip=clip,
                denominator=denominator, zero_norm=zero_norm,
            )
            c = (q * lr_in).to(dtype)
            if skip_decay is not None:
                decay = skip_decay.to(dtype)
            elif decayed:  # g + b*w is already there for the norms: step along it
                direction, wd = decayed[0], 0.0
        else:
            c = torch.as_tensor(lr_in, dtype=dtype, device=device).expand(len(ps))
        c_buf = c if keep is None else c * torch.tensor(bucket[-1], dtype=dtype).to(device, non_blocking=True)
        if vs is not None:
            torch._foreach_mul_(vs, momentum)
            torch._foreach_addcmul_(vs, direction, list(c_buf.unbind(0)))
            if wd != 0:
                torch._foreach_addcmul_(vs, ps, list((c_buf * decay).unbind(0)))
        if vs is None or nesterov:
            # w <- w - k*(g + b*w) [- lr_out*m*v_new], k = lr*r: the decay as a rescaling of w
            k = c if lr_in_momentum else c * _as_device_scalar(lr, dtype, device)
            if wd != 0:
                torch._foreach_mul_(ps, list((1 - k * decay).unbind(0)))
            torch._foreach_addcmul_(ps, direction, list((-k).unbind(0)))
            if vs is not None:
                if lr_in_momentum or not isinstance(lr, Tensor):
                    torch._foreach_add_(ps, vs, alpha=-momentum * (1.0 if lr_in_momentum else lr))
                else:
                    scale = -momentum * _as_device_scalar(lr, dtype, device)
                    torch._foreach_addcmul_(ps, vs, [scale] * len(ps))
            continue
        if lr_in_momentum:
            torch._foreach_sub_(ps, vs)
        elif isinstance(lr, Tensor):
            torch._foreach_addcmul_(ps, vs, [-_as_device_scalar(lr, dtype, device)] * len(ps))
        else:
            torch._foreach_add_(ps, vs, alpha=-lr)


def _as_device_scalar(lr: float | Tensor, dtype: torch.dtype, device: torch.device) -> float | Tensor:
    """A tensor rate as a 0-dim tensor of the parameters' dtype and device; a float as itself."""
    if not isinstance(lr, Tensor):
        return lr
    return lr.to(device=device, dtype=dtype, non_blocking=True)


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
