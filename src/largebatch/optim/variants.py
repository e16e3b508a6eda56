"""The published LARS and LAMB variants by name: each codebase's update as options of ours.

``variant("vicreg", model.parameters(), lr=..., weight_decay=...)`` builds the optimizer that
codebase builds, including which tensors it keeps out of the decay and the ratio when it is
given plain parameters. Formulas, sources and measured differences: docs/optimizers.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS

__all__ = ["EXCLUSIONS", "OVERRIDABLE", "VARIANTS", "Variant", "variant"]

# What a codebase does with 1-D tensors (biases, norm weights) when handed plain parameters.
EXCLUSIONS = {
    "none": "every tensor takes the ratio and the decay",
    "both": "1-D tensors take neither the ratio nor the decay",
    "decay": "1-D tensors take no decay (and so, where the ratio needs decay, no ratio)",
    "ratio": "1-D tensors take the decay but not the ratio",
}
# The options a caller may set on top of a variant's, per optimizer.
OVERRIDABLE = {
    "LARS": ("lr", "weight_decay", "momentum", "trust_coefficient", "eps", "implementation"),
    "LAMB": ("lr", "weight_decay", "eps", "betas", "max_grad_norm", "implementation"),
}


@dataclass(frozen=True)
class Variant:
    """One published optimizer as options of ours: ``optimizer`` is ``"LARS"`` or ``"LAMB"``."""

    optimizer: str
    description: str
    source: str
    options: Mapping[str, Any] = field(default_factory=dict)
    exclude: str = "none"
    # True where the codebase's optimizer itself tests each tensor (solo-learn, VICReg, ...):
    # the exclusion then applies inside parameter groups given by the caller too.
    exclude_inside: bool = False


_TORCH_STYLE = dict(lr_in_momentum=False)

VARIANTS: Mapping[str, Variant] = MappingProxyType({
    "paper": Variant(
        "LARS", "LARS as Intel Caffe 1.0.7 released it: lr inside the momentum, r = eta|w|/(|g|+b|w|+e)",
        "intel/caffe sgd_solver.cpp (LARS); You, Gitman, Ginsburg 2017",
        dict(momentum=0.9, trust_coefficient=0.001, eps=0.0),
    ),
    "timm-lars": Variant(
        "LARS", "timm's Lars: torch-style momentum, ratio only where decayed, r = 1 at a zero norm",
        "huggingface/pytorch-image-models timm/optim/lars.py",
        dict(lr=1.0, momentum=0.9, trust_coefficient=0.001, eps=1e-8, adapt_without_decay=False, **_TORCH_STYLE),
        exclude="decay",
    ),
    "timm-larc": Variant(
        "LARS", "timm's Lars with trust_clip=True (its 'larc'): the rate capped as apex LARC, min(r, lr)",
        "huggingface/pytorch-image-models timm/optim/lars.py",
        dict(lr=1.0, momentum=0.9, trust_coefficient=0.001, eps=1e-8, adapt_without_decay=False, clip="larc",
             **_TORCH_STYLE),
        exclude="decay",
    ),
    "lightly": Variant(
        "LARS", "lightly's LARS (Lightning Bolts): torch-style, ratio only where decayed, zero norm skips both",
        "lightly-ai/lightly lightly/utils/lars.py",
        dict(momentum=0.0, trust_coefficient=0.001, eps=1e-8, adapt_without_decay=False, zero_norm="skip",
             **_TORCH_STYLE),
    ),
    "solo-learn": Variant(
        "LARS", "solo-learn's LARS as its recipes set it: eta 0.02, LARC clip, 1-D tensors excluded",
        "vturrisi/solo-learn solo/utils/lars.py (recipes: scripts/pretrain/*/*.yaml)",
        dict(momentum=0.9, trust_coefficient=0.02, eps=1e-8, clip="larc", zero_norm="skip", **_TORCH_STYLE),
        exclude="both", exclude_inside=True,
    ),
    "vicreg": Variant(
        "LARS", "VICReg / Barlow Twins LARS: torch-style, r = eta|w|/|g+bw|, 1-D tensors excluded",
        "facebookresearch/vicreg main_vicreg.py; facebookresearch/barlowtwins main.py",
        dict(momentum=0.9, trust_coefficient=0.001, eps=0.0, denominator="update", **_TORCH_STYLE),
        exclude="both", exclude_inside=True,
    ),
    "byol": Variant(
        "LARS", "optax.lars as BYOL uses it: lr inside the momentum, r = eta|w|/(|g+bw|+e), 1-D excluded",
        "google-deepmind/optax optax/_src/alias.py (lars); deepmind-research byol",
        dict(momentum=0.9, trust_coefficient=0.001, eps=0.0, denominator="update"),
        exclude="both", exclude_inside=True,
    ),
    "simclr": Variant(
        "LARS", "SimCLR's LARSOptimizer (classic momentum): lr inside, r = eta|w|/|g+bw|, 1-D excluded",
        "google-research/simclr lars_optimizer.py (tf2/lars_optimizer.py)",
        dict(momentum=0.9, trust_coefficient=0.001, eps=0.0, denominator="update"),
        exclude="both", exclude_inside=True,
    ),
    "vissl": Variant(
        "LARS", "VISSL's LARS: torch-style, r = eta|w|/|g+bw|, 1-D tensors decayed but not adapted",
        "facebookresearch/vissl vissl/optimizers/lars.py",
        dict(lr=0.1, momentum=0.9, trust_coefficient=0.001, eps=0.0, denominator="update", **_TORCH_STYLE),
        exclude="ratio", exclude_inside=True,
    ),
    "apex-larc": Variant(
        "LARS", "apex LARC (clip=True) around torch SGD(momentum=0.9): min(r, lr), zero norm skips both",
        "NVIDIA/apex apex/parallel/LARC.py",
        dict(momentum=0.9, trust_coefficient=0.02, eps=1e-8, clip="larc", zero_norm="skip", **_TORCH_STYLE),
    ),
    "timm-lamb": Variant(
        "LAMB", "timm's Lamb: gradients clipped to global norm 1.0, ratio only where decayed",
        "huggingface/pytorch-image-models timm/optim/lamb.py",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0,
             adapt_without_decay=False),
        exclude="decay",
    ),
    "apex-lamb": Variant(
        "LAMB", "apex FusedLAMB: gradients clipped to global norm 1.0, ratio only where decayed",
        "NVIDIA/apex apex/optimizers/fused_lamb.py, csrc/multi_tensor_lamb.cu",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0,
             adapt_without_decay=False),
    ),
    "apex-nvlamb": Variant(
        "LAMB", "apex FusedLAMB(use_nvlamb=True): as apex-lamb, with the ratio on every tensor",
        "NVIDIA/apex apex/optimizers/fused_lamb.py, csrc/multi_tensor_lamb.cu",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, max_grad_norm=1.0),
    ),
    "lamb-paper": Variant(
        "LAMB", "LAMB as You et al. 2019 (Algorithm 2) state it: no clipping, every tensor adapted",
        "You et al., Large Batch Optimization for Deep Learning (ICLR 2020), Algorithm 2",
        dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0),
    ),
})


def _split(group: dict[str, Any], exclude: str) -> list[dict[str, Any]]:
    """A group split the way a codebase treats its 1-D tensors (other keys kept on both halves)."""
    params = list(group["params"])
    if exclude == "none":
        return [{**group, "params": params}]
    low = [p for p in params if p.ndim <= 1]
    high = [p for p in params if p.ndim > 1]
    excluded = {"both": {"lars_adapt": False, "weight_decay": 0.0}, "decay": {"weight_decay": 0.0},
                "ratio": {"lars_adapt": False}}[exclude]
    groups = [{**group, "params": high}] if high else []
    if low:
        groups.append({**group, "params": low, **excluded})
    return groups


def variant(name: str, params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]], **options: Any) -> Optimizer:
    """The optimizer ``name`` (a key of :data:`VARIANTS`) over ``params``.

    ``params`` may be a module, plain tensors (split as that codebase splits them) or
    parameter groups (taken as given, except that where the codebase's optimizer itself tests
    each tensor, as solo-learn's, VICReg's, VISSL's, optax's and SimCLR's do, its 1-D tensors
    are treated as there). ``options`` override the variant's defaults; which
    ones may be set is listed in :data:`OVERRIDABLE`.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown optimizer variant {name!r}; known: {', '.join(VARIANTS)}")
    spec = VARIANTS[name]
    allowed = OVERRIDABLE[spec.optimizer]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"variant {name!r} ({spec.optimizer}) takes {', '.join(allowed)}; "
                        f"not {', '.join(unknown)}")
    chosen = {**spec.options, **options}
    if "lr" not in chosen:
        raise TypeError(f"variant {name!r} has no default learning rate: give lr=")
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    items = list(params)
    if items and not isinstance(items[0], dict):
        items = _split({"params": items}, spec.exclude)
    elif spec.exclude_inside:
        items = [half for group in items for half in _split(group, spec.exclude)]
    cls = LARS if spec.optimizer == "LARS" else LAMB
    return cls(items, variant=name, **chosen)
