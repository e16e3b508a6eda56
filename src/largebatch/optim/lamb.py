"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning"), per tensor w, gradient g:

    m <- b1*m + (1-b1)*g;   v <- b2*v + (1-b2)*g^2
    u  = (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + e) + b*w
    r  = ||w|| / ||u||      (r = 1 when either norm is 0, or when the group has lars_adapt=False)
    w <- w - lr * r * u

Weight decay is decoupled (added to the Adam direction, not to the gradient). The step count
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

__all__ = ["LAMB", "LAMB_IMPLEMENTATIONS"]

LAMB_IMPLEMENTATIONS = tuple(i for i in IMPLEMENTATIONS if i != "compiled")  # no compiled path for LAMB


class LAMB(Optimizer):
    """Layer-wise adaptive moments for large batches (the same group options as LARS).

    Args:
        params: parameters or groups; per group ``lars_adapt`` and ``weight_decay``.
        lr: learning rate (float or 0-dim tensor).
        betas: (b1, b2) for the first and second moments.
        eps: e, added to the root of the second moment.
        weight_decay: b, decoupled.
        implementation: ``"auto"`` (default: ``"triton"`` for CUDA tensors when triton is
            installed, else ``"foreach"``), ``"triton"`` (three launches per group and dtype:
            step counts, moments with norms, update), ``"foreach"`` or ``"single"``. As for
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
        foreach: bool | None = None,
        implementation: str = "auto",
    ) -> None:
        check_lr(lr)
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta}")
        check_nonnegative("eps", eps)
        check_nonnegative("weight_decay", weight_decay)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, lars_adapt=True,
            foreach=foreach, implementation=implementation,
        )
        super().__init__(params, defaults)
        self._tables: dict[Any, Any] = {}  # Triton path: packed address tables
        for group in self.param_groups:
            check_implementation(group, LAMB_IMPLEMENTATIONS, "LAMB")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._tables = {}
        for group in self.param_groups:
            group.setdefault("implementation", "auto")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, except that the path (``implementation``, ``foreach``, ``fused``) stays the
        one this optimizer was built with: the saved state is the same on every path."""
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
            extra: dict[str, Any] = {}
            if implementation == "triton":
                update = _triton_lamb
                extra = {"tables": self._tables, "group_index": index,
                         "explicit": group.get("implementation") == "triton",
                         "grad_scale": getattr(self, "grad_scale", None),
                         "found_inf": getattr(self, "found_inf", None)}
            elif implementation == "single":
                update = _single_tensor_lamb
            else:
                update = _multi_tensor_lamb
            update(
                params, grads, [b[0] for b in buffers], [b[1] for b in buffers], steps,
                lr=group["lr"], betas=group["betas"], eps=group["eps"],
                weight_decay=group["weight_decay"], adapt=group["lars_adapt"], **extra,
            )
        return loss


def _direction(m: Tensor, v: Tensor, step: Tensor, betas: tuple[float, float], eps: float) -> Tensor:
    b1, b2 = betas
    bias1 = 1 - torch.pow(b1, step)
    bias2 = 1 - torch.pow(b2, step)
    return (m / bias1) / ((v / bias2).sqrt() + eps)


def _single_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor, betas: tuple[float, float], eps: float,
    weight_decay: float, adapt: bool,
) -> None:
    b1, b2 = betas
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step.add_(1)
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        u = _direction(m, v, step.to(accumulation_dtype(p.dtype)), betas, eps)
        if weight_decay != 0:
            u.add_(p, alpha=weight_decay)
        rate: float | Tensor = lr
        if adapt:
            w_norm, u_norm = tensor_norm(p), tensor_norm(u)
            rate = safe_ratio(w_norm, u_norm, w_norm, u_norm) * lr
        p.sub_(u * rate)


def _multi_tensor_lamb(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    steps: list[Tensor], *, lr: float | Tensor, betas: tuple[float, float], eps: float,
    weight_decay: float, adapt: bool,
) -> None:
    b1, b2 = betas
    for ps, gs, ms, vs, ts in group_by_device_and_dtype(params, grads, exp_avgs, exp_avg_sqs, steps):
        torch._foreach_add_(ts, 1)
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, gs, alpha=1 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - b2)
        step = torch.stack(ts).to(accumulation_dtype(ps[0].dtype))  # never bf16
        bias1 = list((1 - torch.pow(b1, step)).unbind(0))
        root_bias2 = list((1 - torch.pow(b2, step)).sqrt().unbind(0))
        # (m / bias1) / (sqrt(v) / sqrt(bias2) + eps), the same value as _direction
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, root_bias2)
        torch._foreach_add_(denom, eps)
        u = torch._foreach_div(ms, bias1)
        torch._foreach_div_(u, denom)
        if weight_decay != 0:
            torch._foreach_add_(u, ps, alpha=weight_decay)
        if adapt:
            w_norm = tensor_norms(ps)
            u_norm = tensor_norms(u)
            rates = list((safe_ratio(w_norm, u_norm, w_norm, u_norm) * lr).unbind(0))
            torch._foreach_mul_(u, rates)
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
