"""What the planner needs to know about a network: parameter count and forward FLOPs per image.

Profiles come from ``largebatch.models`` (built and counted) when it knows the name, or from the
published figures for the paper's models (docs/paper.md), or from the user (``--params``/``--flops``).
``largebatch.models`` (and with it torch) is imported lazily so that planning needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from largebatch.plan.errors import PlanError

__all__ = ["PAPER_PROFILES", "Profile", "profile_from_models", "resolve_profile"]


@dataclass(frozen=True)
class Profile:
    """params: parameters (gradient elements); flops: forward FLOPs per image (2 x MACs)."""

    name: str
    params: int
    flops: float
    source: str = ""

    @property
    def flops_per_param(self) -> float:
        """Forward FLOPs per image per parameter: the compute-to-communication ratio of the model."""
        return self.flops / self.params


# docs/paper.md, "Model sizes": AlexNet 61M parameters, ~0.72 G multiply-adds per image; ResNet-50
# 25.6M, ~4.1 G. AlexNet-BN adds BatchNorm before conv2-conv5 (a few thousand parameters, no
# multiply-adds in the usual count), so it takes AlexNet's figures.
PAPER_PROFILES = {
    "alexnet": Profile("alexnet", 61_000_000, 2 * 0.72e9, "docs/paper.md: 61M parameters, 0.72 G MACs"),
    "alexnet_bn": Profile("alexnet_bn", 61_000_000, 2 * 0.72e9,
                          "docs/paper.md (AlexNet figures): 61M, 0.72 G MACs"),
    "resnet50": Profile("resnet50", 25_600_000, 2 * 4.1e9, "docs/paper.md: 25.6M parameters, 4.1 G MACs"),
}


def profile_from_models(name: str, num_classes: int = 1000) -> Profile | None:
    """Build the model with ``largebatch.models`` and count it; None when it does not know the name."""
    from largebatch import models  # lazy: it imports torch

    if name not in models.MODEL_NAMES:
        return None
    net = models.build_model(name, num_classes)
    size = models.default_input_size(name)
    channels = 1 if size <= 28 else 3  # the 28x28 variants are for grayscale Fashion-MNIST
    prof = models.profile_model(net, (channels, size, size))
    return Profile(name, int(prof.params), float(prof.flops), f"largebatch.models.profile_model at {size}x{size}")


def resolve_profile(
    name: str,
    source: str = "auto",
    params: int | None = None,
    flops: float | None = None,
    num_classes: int = 1000,
) -> Profile:
    """A profile by name. source: 'auto' (models, then paper), 'models', 'paper'; params/flops override."""
    for flag, value in (("--params", params), ("--flops", flops)):
        if value is not None and not value > 0:
            raise PlanError(f"{flag} must be > 0, got {value:g}")
    if params is not None and flops is not None:
        if params <= 0 or flops <= 0:
            raise PlanError(f"--params and --flops must be > 0, got {params} and {flops}")
        return Profile(name, int(params), float(flops), "given on the command line")
    if source not in ("auto", "models", "paper"):
        raise PlanError(f"profile source must be auto, models or paper, got {source!r}")
    found = None
    if source in ("auto", "models"):
        found = profile_from_models(name, num_classes)
        if found is None and source == "models":
            raise PlanError(f"largebatch.models does not know {name!r}")
    if found is None:
        found = PAPER_PROFILES.get(name)
    if found is None:
        known = ", ".join(sorted(PAPER_PROFILES))
        raise PlanError(f"no profile for model {name!r}; paper profiles: {known}; or give --params and --flops")
    if params is not None or flops is not None:
        found = Profile(name, int(params or found.params), float(flops or found.flops), found.source + ", overridden")
    return found
