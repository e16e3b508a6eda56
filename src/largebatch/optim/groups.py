"""Parameter groups: which tensors get the layer-wise ratio and which get weight decay."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["Selector", "is_bias_or_norm", "param_groups"]

Selector = Callable[[str, Tensor], bool]


def is_bias_or_norm(name: str, param: Tensor) -> bool:
    """The usual exclusion: tensors with ndim <= 1 (biases, BatchNorm/LayerNorm weights)."""
    return param.ndim <= 1


def _selector(choice: Selector | bool | None) -> Selector:
    if choice is None or choice is True:
        return is_bias_or_norm
    if choice is False:
        return lambda name, param: False
    if callable(choice):
        return choice
    raise TypeError(f"an exclusion must be a callable (name, param) -> bool or a bool, got {choice!r}")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    exclude_from_adaptation: Selector | bool | None = None,
    exclude_from_decay: Selector | bool | None = None,
) -> list[dict]:
    """Split a model's trainable parameters into groups for LARS or LAMB.

    By default every tensor with ndim <= 1 is excluded from both the trust ratio and weight
    decay (one report: ResNet-50 at batch 8K went from 74.3% to 76.1% top-1 with this). Each
    exclusion is a predicate ``(name, param) -> bool``, ``True`` for the default, or ``False``
    to exclude nothing. Empty groups are left out.
    """
    no_adapt = _selector(exclude_from_adaptation)
    no_decay = _selector(exclude_from_decay)
    buckets: dict[tuple[bool, bool], list[Tensor]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = (not no_adapt(name, param), not no_decay(name, param))
        buckets.setdefault(key, []).append(param)
    return [
        {"params": params, "lars_adapt": adapt, "weight_decay": weight_decay if decay else 0.0}
        for (adapt, decay), params in sorted(buckets.items(), reverse=True)
    ]
