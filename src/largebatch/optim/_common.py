"""Pieces shared by the layer-wise optimizers: validation, norms, ratios, tensor grouping."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "IMPLEMENTATIONS",
    "KERNEL_OPTIONS",
    "PATH_KEYS",
    "accumulation_dtype",
    "add_checked_group",
    "adopt_peer_state",
    "amp_scaling_supported",
    "check_implementation",
    "check_loadable",
    "check_lr",
    "check_nonnegative",
    "check_path_computes",
    "check_real",
    "chosen_implementation",
    "collect_grads",
    "group_by_device_and_dtype",
    "kernel_refusal",
    "load_keeping_path_choice",
    "safe_ratio",
    "tensor_norm",
    "tensor_norms",
]

IMPLEMENTATIONS = ("auto", "triton", "foreach", "compiled", "single")
# Group keys that choose how the update is computed, not what it is: they belong to the process
# that steps (its device, its installed packages), not to a checkpoint.
PATH_KEYS = ("implementation", "foreach", "fused")
# Options the Triton kernels (and LARS's compiled kernel) compute only at these values: the
# published variants that need others run on "foreach" or "single". A group without the key has
# the value shown (a checkpoint written before the option existed, or the other optimizer's group).
KERNEL_OPTIONS = {
    "lr_in_momentum": True,
    "denominator": "sum",
    "zero_norm": "unit",
    "dampening": 0.0,
    "max_grad_norm": None,
    "bias_correction": True,
    "adam_w_mode": True,
    "grad_averaging": True,
    "trust_clip": False,
}


def check_lr(lr: float | Tensor) -> None:
    """Refuse a negative or non-finite rate; accept a float or a 0-dim tensor (checked once, here)."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"lr must be a float or a 0-dim tensor, got a tensor of shape {tuple(lr.shape)}")
    value = float(lr)  # construction time only, never inside step()
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"lr must be finite and >= 0, got {lr}")


def check_nonnegative(name: str, value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def check_real(params: Iterable[Tensor], owner: str) -> None:
    """Refuse complex parameters in one line: the norms and squares would silently be wrong."""
    for p in params:
        if isinstance(p, Tensor) and p.is_complex():
            raise TypeError(f"{owner} does not support complex parameters (got a {p.dtype} tensor of shape "
                            f"{tuple(p.shape)}); optimize its real and imaginary parts as real tensors")


def kernel_refusal(group: dict) -> str | None:
    """``"option=value"`` for the first option of ``group`` that the kernels do not compute, else None."""
    for key, computed in KERNEL_OPTIONS.items():
        value = group.get(key, computed)
        if value != computed:
            return f"{key}={value!r}"
    if group.get("clip") == "larc":
        return "clip='larc'"
    return None


def check_loadable(
    owner: str, saved_groups: Sequence[dict], groups: Sequence[dict], own_keys: Sequence[str],
    conventions: dict[str, Any],
) -> None:
    """Refuse, in one line, a state whose buffers mean something else here.

    A state without ``own_keys`` in its groups was written by another optimizer (torch's SGD,
    timm, lightly...): its momentum buffer may hold lr*v or v, so it is refused rather than
    misread. A state of ours whose buffer convention (``conventions``: key -> value implied when
    the key is absent, i.e. before the option existed) differs from this optimizer's is refused too.
    """
    for index, (saved, group) in enumerate(zip(saved_groups, groups, strict=False)):
        missing = [k for k in own_keys if k not in saved]
        if missing:
            raise ValueError(
                f"{owner}.load_state_dict: group {index} of this state lacks {', '.join(missing)}: it was not "
                f"written by largebatch's {owner}, and its buffers may follow another convention; refused"
            )
        for key, implied in conventions.items():
            before, now = saved.get(key, implied), group.get(key, implied)
            if before != now:
                raise ValueError(
                    f"{owner}.load_state_dict: the state was written with {key}={before!r} and this optimizer has "
                    f"{key}={now!r}; its buffers mean something else here, so it is refused"
                )


# Hyper-parameters every peer's group spells as we do; a peer's state brings these along.
_SHARED_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "eps", "betas")


def adopt_peer_state(
    state_dict: dict, groups: Sequence[dict], own_keys: Sequence[str], renames: dict[str, str],
    step_from_group: bool = False,
) -> dict | None:
    """A state written by the codebase this optimizer's variant reproduces, rewritten as ours, or None.

    Applies only when no saved group is ours (lacks ``own_keys``) and every group of this
    optimizer was built by :func:`largebatch.optim.variant`, which the caller checks names a
    variant whose buffers hold what the peer's do: the conversion is then exact. The options
    come from this optimizer, the hyper-parameters every peer spells as we do (lr, momentum,
    weight decay, ...) from the state; buffers are renamed (VICReg's ``mu``), and a per-group
    step count (timm's and apex's LAMB) becomes each tensor's.
    """
    saved_groups = state_dict["param_groups"]
    if any(all(k in saved for k in own_keys) for saved in saved_groups):
        return None
    if len(saved_groups) != len(groups) or not all(g.get("variant") for g in groups):
        return None
    param_groups = []
    for saved, group in zip(saved_groups, groups, strict=True):
        new = {k: v for k, v in group.items() if k != "params"}
        new.update({k: saved[k] for k in _SHARED_KEYS if k in saved})
        if "betas" in new:
            new["betas"] = tuple(new["betas"])
        new["params"] = saved["params"]
        param_groups.append(new)
    state = {index: {renames.get(k, k): v for k, v in entry.items()} for index, entry in state_dict["state"].items()}
    if step_from_group:
        for saved in saved_groups:
            for index in saved["params"]:
                if index in state and "step" not in state[index] and "step" in saved:
                    state[index]["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
    return {"state": state, "param_groups": param_groups}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms and ratios in float64 for float64 tensors, else float32 (also for bf16/fp16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tensor_norm(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dtype=accumulation_dtype(t.dtype))


def tensor_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Per-tensor L2 norms as one vector, in one multi-tensor call, without leaving the device."""
    if not tensors:
        return torch.empty(0)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=accumulation_dtype(tensors[0].dtype)))


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


def _from_flags(group: dict) -> str | None:
    """The path torch-style flags ask for (``fused=True``, ``foreach=True/False``), if any."""
    if group.get("fused"):
        return "compiled"
    if group.get("foreach") is False:
        return "single"
    if group.get("foreach"):
        return "foreach"
    return None


def check_implementation(group: dict, allowed: Sequence[str], owner: str) -> None:
    """Refuse an unknown path, or flags that contradict it, at construction."""
    choice = group.get("implementation", "auto")
    if choice not in allowed:
        raise ValueError(f"{owner}: implementation must be one of {', '.join(allowed)}; got {choice!r}")
    flagged = _from_flags(group)
    if choice != "auto" and flagged is not None and flagged != choice:
        raise ValueError(
            f"{owner}: implementation={choice!r} contradicts foreach={group.get('foreach')}, "
            f"fused={group.get('fused')}; give one or the other"
        )
    check_path_computes(group, owner, choice if choice != "auto" else flagged)
    if choice == "triton" and group["params"]:
        from largebatch.optim._triton import check_usable

        check_usable(group["params"][0].device, owner)


def check_path_computes(group: dict, owner: str, path: str | None) -> None:
    """Refuse, in one line, an explicitly chosen kernel path for an option it does not compute."""
    if path in ("triton", "compiled"):
        refused = kernel_refusal(group)
        if refused is not None:
            raise ValueError(f"{owner}(implementation={path!r}) does not compute {refused}; "
                             "use implementation='foreach' or 'single'")


def chosen_implementation(group: dict, device: torch.device) -> str:
    """The path a group takes: an explicit choice, else torch-style flags, else the default.

    The default is the Triton multi-tensor kernel for CUDA tensors (when triton is installed
    and the group's options are ones the kernels compute) and the ``_foreach`` path otherwise
    (see the optimizer's docstring for the measurement).
    """
    choice = group.get("implementation", "auto")
    if choice != "auto":
        return choice
    flagged = _from_flags(group)
    if flagged is not None:
        return flagged
    if device.type == "cuda" and kernel_refusal(group) is None:
        from largebatch.optim._triton import triton_installed

        if triton_installed():
            return "triton"
    return "foreach"


def amp_scaling_supported(groups: Sequence[dict]) -> bool:
    """True when every tensor goes through the Triton kernels, which unscale and skip on device.

    GradScaler then hands the step its scale and inf flag instead of unscaling gradients in a
    separate pass and reading the inf flag back to the host.
    """
    from largebatch.optim._triton import SUPPORTED_DTYPES, dense

    for group in groups:
        params = group["params"]
        if not params or chosen_implementation(group, params[0].device) != "triton":
            return False
        for p in params:
            if p.dtype not in SUPPORTED_DTYPES or not dense(p):
                return False
            if p.grad is not None and p.grad.stride() != p.stride():
                return False
    return True


def add_checked_group(optimizer: torch.optim.Optimizer, add: Callable[[dict], None], group: dict,
                      check: Callable[[dict], None]) -> None:
    """torch's add_param_group, then the constructor's ``check`` on the group as torch filled it in;
    a refused group is taken out again, so the optimizer is left as it was."""
    add(group)
    try:
        check(optimizer.param_groups[-1])
    except Exception:
        optimizer.param_groups.pop()
        raise


def load_keeping_path_choice(optimizer: torch.optim.Optimizer, load: Callable[[dict], None], state_dict: dict) -> None:
    """torch's load_state_dict, except that each group keeps this process's PATH_KEYS.

    A checkpoint written on a GPU with ``implementation="triton"`` then resumes on the CPU with
    whatever this process asked for: the state (buffers, step counts) is the same on every path.
    """
    chosen = [{k: g[k] for k in PATH_KEYS if k in g} for g in optimizer.param_groups]
    load(state_dict)
    for group, keep in zip(optimizer.param_groups, chosen, strict=True):
        group.update(keep)
