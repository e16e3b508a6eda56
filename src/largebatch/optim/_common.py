"""Pieces shared by the layer-wise optimizers: validation, norms, ratios, tensor grouping."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def check_lr(lr: float | Tensor) -> None:
    """Refuse a negative or non-finite rate; accept a float or a 0-dim tensor (checked once, here)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr must be a float or a 0-dim tensor, got a tensor of shape {tuple(lr.shape)}")
        value = float(lr)  # construction time only, never inside step()
    else:
        value = float(lr)
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"lr must be finite and >= 0, got {lr}")


def check_nonnegative(name: str, value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and ratios in float64 for float64 tensors, else float32 (also for bf16/fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dtype=accumulation_dtype(t.dtype))


def tensor_norms(tensors: Sequence[Tensor], foreach: bool) -> Tensor:
    """Per-tensor L2 norms as one vector, without leaving the device."""
    if not tensors:
        return torch.empty(0)
    if foreach:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(tensors[0].dtype)))
    return torch.stack([tensor_norm(t) for t in tensors])


def safe_ratio(numerator: Tensor, denominator: Tensor, w_norm: Tensor, other_norm: Tensor) -> Tensor:
    """numerator / denominator, or 1 where either norm is zero (the convention of LARS and LAMB)."""
    ratio = numerator / denominator
    return torch.where((w_norm > 0) & (other_norm > 0), ratio, torch.ones_like(ratio))


def group_by_device_and_dtype(*lists: Sequence[Tensor]) -> Iterable[tuple[list[Tensor], ...]]:
    """Split parallel lists so each foreach call sees tensors of one device and dtype."""
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = defaultdict(
        lambda: tuple([] for _ in lists)
    )
    for items in zip(*lists, strict=True):
        key = (items[0].device, items[0].dtype)
        for bucket, item in zip(buckets[key], items, strict=True):
            bucket.append(item)
    return buckets.values()


def collect_grads(group: dict, state: dict, buffer_names: Sequence[str]) -> tuple[list, list, list]:
    """Parameters with a gradient, their gradients, and their (lazily zero-initialised) state buffers.

    Buffers start at zero so that every path, eager or fused, sees the same first update.
    """
    params, grads, buffers = [], [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("largebatch optimizers do not support sparse gradients")
        params.append(p)
        grads.append(p.grad)
        st = state[p]
        if buffer_names:
            for name in buffer_names:
                if name not in st:
                    st[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(tuple(st[name] for name in buffer_names))
    return params, grads, buffers
