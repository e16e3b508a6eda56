"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), per tensor w, gradient g:

    m <- b1*m + (1-b1)*g;   v <- b2*v + (1-b2)*g^2
    u  = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + e) + b*w
    r  = ||w|| / ||u||      (r = 1 when either norm is 0, or when the group has lars_adapt=False)
    w <- w - lr * r * u

Weight decay is decoupled (added to the Adam direction, not to the gradient). Options reproduce
apex's FusedLAMB/NVLAMB and timm's Lamb (global gradient clipping, no bias correction, L2 decay,
no gradient averaging, trust clipping, ratio only where decayed; docs/optimizers.md). The step count
is a float32 tensor on the parameters' device, so bias correction never reads back to the host,
and the bias corrections are computed in float32 (float64 for float64 tensors) whatever the
parameter dtype: in bf16, 0.999 rounds to 1 and 1 - b2^t would be 0.
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

__all__ = ["LAMB", "LAMB_IMPLEMENTATIONS"]

LAMB_IMPLEMENTATIONS = tuple(i for i in IMPLEMENTATIONS if i != "compiled")  # no compiled path for LAMB


class LAMB(Optimizer):
    """Layer-wise adaptive moments for large batches (the same group options as LARS).

    Args:
        params: parameters or groups; per group ``lars_adapt`` and ``weight_decay``.
        lr: learning rate (float or 0-dim tensor).
        betas: (b1, b2) for the first and second moments.
        eps: e, added to the root of the second moment.
        weight_decay: b, decoupled (added to the Adam direction) unless ``adam_w_mode=False``.
        max_grad_norm: when set, every gradient is first divided by max(G / max_grad_norm, 1),
            G the norm of all the gradients of all groups together (timm's and apex's default,
            1.0); ``None`` (default, the paper) leaves them as they are.
        bias_correction: ``False`` drops the 1/(1-b^t) corrections (apex, timm option).
        adam_w_mode: ``False`` adds b*w to the gradient before the moments (L2), as apex's
            ``adam_w_mode=False``.
        grad_averaging: ``False`` accumulates m <- b1*m + g instead of (1-b1)*g (apex, timm).
        trust_clip: cap the ratio at 1 (LAMBC; timm's ``trust_clip``).
        adapt_without_decay: ``False`` applies the ratio only where weight_decay != 0 (timm's
            default, apex's without ``use_nvlamb``).
        variant: the name of the published variant this optimizer follows (recorded in its state).
        implementation: ``"auto"`` (default: ``"triton"`` for CUDA tensors when triton is
            installed and the options are ones its kernels compute, else ``"foreach"``),
            ``"triton"`` (three launches per group and dtype: step counts, moments with norms,
            update; refused, in one line, for any option above away from its default),
            ``"foreach"`` or ``"single"`` (every option). As for
            :class:`~largebatch.optim.LARS`, an explicit ``"triton"`` that cannot run is refused.
        foreach: torch-style switch, kept for compatibility: True = ``"foreach"``,
            False = ``"single"``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        max_grad_norm: float | None = None,
        bias_correction: bool = True,
        adam_w_mode: bool = True,
        grad_averaging: bool = True,
        trust_clip: bool = False,
        adapt_without_decay: bool = True,
        variant: str | None = None,
        foreach: bool | None = None,
        implementation: str = "auto",
    ) -> None:
        check_lr(lr)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
            bias_correction=bias_correction, adam_w_mode=adam_w_mode, grad_averaging=grad_averaging,
            trust_clip=trust_clip, adapt_without_decay=adapt_without_decay, variant=variant, lars_adapt=True,
            foreach=foreach, implementation=implementation,
        )
        self._tables: dict[Any, Any] = {}  # Triton path: packed address tables
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, with the constructor's checks (a bad group is refused and not kept)."""
        add_checked_group(self, super().add_param_group, param_group, _check_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._tables = {}
        for group in self.param_groups:
            for key, value in _GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that the path (``implementation``, ``foreach``, ``fused``) stays the
        one this optimizer was built with: the saved state is the same on every path. A state
        written by another optimizer, or whose moments follow another convention
        (``grad_averaging``, ``adam_w_mode``), is refused in one line, except the state of the
        codebase a :func:`~largebatch.optim.variant` reproduces (timm's or apex's LAMB: the same
        moments, and their per-group step count becomes each tensor's)."""
        state_dict = adopt_peer_state(state_dict, self.param_groups, ("betas", "lars_adapt"), {},
                                      step_from_group=True) or state_dict
        check_loadable("LAMB", state_dict["param_groups"], self.param_groups, ("betas", "lars_adapt"),
                       {"grad_averaging": True, "adam_w_mode": True})
        load_keeping_path_choice(self, super().load_state_dict, state_dict)
        for p, st in self.state.items():  # torch leaves "step" where it was saved; kernels read it on p's device
            if isinstance(st.get("step"), Tensor) and st["step"].device != p.device:
                st["step"] = st["step"].to(p.device)
        self._tables = {}

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Read by torch.amp.GradScaler: True when the Triton kernels unscale and skip themselves."""
        return amp_scaling_supported(self.param_groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Apply one LAMB update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip_divisor = self._clip_divisor()
        for index, group in enumerate(self.param_groups):
            params, grads, buffers = collect_grads(group, self.state, ("exp_avg", "exp_avg_sq"))
            if not params:
                continue
            steps = []
            for p in params:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                steps.append(st["step"])
            implementation = chosen_implementation(group, params[0].device)
            options: dict[str, Any] = dict(
                lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                adapt=group["lars_adapt"] and (group["weight_decay"] != 0 or group["adapt_without_decay"]),
            )
            if implementation == "triton":
                check_path_computes(group, "LAMB", implementation)
                update = _triton_lamb
                options.update(tables=self._tables, group_index=index,
                               explicit=group.get("implementation") == "triton",
                               grad_scale=getattr(self, "grad_scale", None),
                               found_inf=getattr(self, "found_inf", None))
            else:
                update = _single_tensor_lamb if implementation == "single" else _multi_tensor_lamb
                options.update(clip_divisor=clip_divisor, bias_correction=group["bias_correction"],
                               adam_w_mode=group["adam_w_mode"], grad_averaging=group["grad_averaging"],
                               trust_clip=group["trust_clip"])
            update(params, grads, [b[0] for b in buffers], [b[1] for b in buffers], steps, **options)
        return loss

    def _clip_divisor(self) -> Tensor | None:
        """max(G / max_grad_norm, 1), G the norm of every gradient of every group (None: no clipping)."""
        max_norm = self.defaults["max_grad_norm"]
        if max_norm is None:
            return None
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return None
        device = grads[0].device
        per_bucket = [tensor_norms(gs).to(device) for (gs,) in group_by_device_and_dtype(grads)]
        acc = torch.float64 if any(n.dtype == torch.float64 for n in per_bucket) else torch.float32
        total = torch.linalg.vector_norm(torch.cat([n.to(acc) for n in per_bucket]))
        return (total / max_norm).clamp(min=1.0)


_GROUP_DEFAULTS = dict(
    lars_adapt=True, max_grad_norm=None, bias_correction=True, adam_w_mode=True, grad_averaging=True,
    trust_clip=False, adapt_without_decay=True, variant=None, foreach=None, implementation="auto",
)


def _check_group(group: dict[str, Any]) -> None:
    """The constructor's checks, per group: each failure is one line naming the option."""
    check_real(group["params"], "LAMB")
    check_lr(group["lr"])
    for i, beta in enumerate(group["betas"]):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
    check_nonnegative("eps", group["eps"])
    check_nonnegative("weight_decay", group["weight_decay"])
    check_implementation(group, LAMB_IMPLEMENTATIONS, "LAMB")


def _corrections(step: Tensor, betas: tuple[float, float], bias_correction: bool) -> tuple[Any, Any]:
    """(1 - b1^t, sqrt(1 - b2^t)), or (1, 1) without bias correction."""
    if not bias_correction:
        return 1.0, 1.0
    b1, b2 = betas
    return 1 - torch.pow(b1, step), (1 - torch.pow(b2, step)).sqrt()


def _single_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor, betas: tuple[float, float], eps: float,
    weight_decay: float, adapt: bool, clip_divisor: Tensor | None = None, bias_correction: bool = True,
    adam_w_mode: bool = True, grad_averaging: bool = True, trust_clip: bool = False,
) -> None:
    b1, b2 = betas
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step.add_(1)
        if clip_divisor is not None:
            g = g / clip_divisor.to(device=g.device)
        if not adam_w_mode and weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        m.mul_(b1).add_(g, alpha=1 - b1 if grad_averaging else 1.0)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1, root_bias2 = _corrections(step.to(torch.float64), betas, bias_correction)
        u = (m / bias1) / (v.sqrt() / root_bias2 + eps)
        if adam_w_mode and weight_decay != 0:
            u.add_(p, alpha=weight_decay)
        rate: float | Tensor = lr
        if adapt:
            w_norm, u_norm = tensor_norm(p), tensor_norm(u)
            r = safe_ratio(w_norm, u_norm, w_norm, u_norm)
            rate = (r.clamp(max=1.0) if trust_clip else r) * lr
        p.sub_(u * rate)


def _multi_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor, betas: tuple[float, float], eps: float,
    weight_decay: float, adapt: bool, clip_divisor: Tensor | None = None, bias_correction: bool = True,
    adam_w_mode: bool = True, grad_averaging: bool = True, trust_clip: bool = False,
) -> None:
    b1, b2 = betas
    for ps, gs, ms, vs, ts in group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, steps):
        torch._foreach_add_(ts, 1)
        if clip_divisor is not None:  # a copy: p.grad is never written
            gs = torch._foreach_div(gs, clip_divisor.to(device=ps[0].device, dtype=ps[0].dtype))
        if not adam_w_mode and weight_decay != 0:
            if clip_divisor is None:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)
            else:
                torch._foreach_add_(gs, ps, alpha=weight_decay)
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, gs, alpha=1 - b1 if grad_averaging else 1.0)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        denom = torch._foreach_sqrt(vs)
        if bias_correction:
            step = torch.stack(ts).to(torch.float64)  # a few scalars: in fp32, 1 - 0.999 is off by 1.3e-5
            bias1 = list((1 - torch.pow(b1, step)).unbind(0))
            root_bias2 = list((1 - torch.pow(b2, step)).sqrt().unbind(0))
            # (m / bias1) / (sqrt(v) / sqrt(bias2) + eps), the same value as the single path
            torch._foreach_div_(denom, root_bias2)
            torch._foreach_add_(denom, eps)
            u = torch._foreach_div(ms, bias1)
            torch._foreach_div_(u, denom)
        else:
            torch._foreach_add_(denom, eps)
            u = torch._foreach_div(ms, denom)
        if adam_w_mode and weight_decay != 0:
            torch._foreach_add_(u, ps, alpha=weight_decay)
        if adapt:
            w_norm = tensor_norms(ps)
            u_norm = tensor_norms(u)
            r = safe_ratio(w_norm, u_norm, w_norm, u_norm)
            if trust_clip:
                r = r.clamp(max=1.0)
            torch._foreach_mul_(u, list((r * lr).unbind(0)))
        else:
            torch._foreach_mul_(u, lr)
        torch._foreach_sub_(ps, u)


def _triton_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, tables: dict[Any, Any], group_index: int, explicit: bool,
    grad_scale: Tensor | None, found_inf: Tensor | None, **options: Any,
) -> None:
    """Triton kernels per (device, dtype) bucket; a dtype they lack is refused if asked for by name."""
    for ps, gs, ms, vs, ts in group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, steps):
        _triton.check_usable(ps[0].device, "LAMB")  # e.g. moved to the CPU after construction
        if ps[0].dtype not in _triton.SUPPORTED_DTYPES:
            if explicit:
                raise TypeError(f"LAMB(implementation='triton') supports float32, bfloat16 and float16 "
                                f"parameters, not {ps[0].dtype}")
            _multi_tensor_lamb(ps, gs, ms, vs, ts, **options)
            continue
        prepared = _triton.prepare(tables, (group_index, ps[0].device, ps[0].dtype), [ps, gs, ms, vs, ts], 4)
        if prepared.odd:  # not dense, or laid out unlike its gradient: rare, and correct one at a time
            o_ps, o_gs, o_ms, o_vs, o_ts = (_triton.take(xs, prepared.odd) for xs in (ps, gs, ms, vs, ts))
            _triton.single_under_scaler(  # unscaled and skipped as the kernels do (GradScaler relies on it)
                functools.partial(_single_tensor_lamb, o_ps, exp_avgs=o_ms, exp_avg_sqs=o_vs, steps=o_ts, **options),
                o_gs, o_ps + o_ms + o_vs + o_ts, grad_scale, found_inf)
        if prepared.table is not None:
            _triton.lamb_step(prepared.table, _triton.take(ts, prepared.flat), grad_scale=grad_scale,
                              found_inf=found_inf, **options)
