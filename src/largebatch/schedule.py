"""Learning rate as a pure function of the global step, so that resuming needs only the step.

The paper's schedule is a linear warm-up followed by polynomial decay of power 2. Two origins of
the decay are in use: Intel Caffe as released computes base * (1 - step/T)^p from step 0 (a small
drop at the end of warm-up), the MLPerf reference decays from the end of warm-up to ``end_lr``
(continuous). Both are here (``decay_origin``), along with cosine and step decays, the linear and
square-root scaling rules, and the MLPerf ResNet-50 LARS preset keyed on the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "DECAYS",
    "ORIGINS",
    "Decay",
    "WarmupDecay",
    "backwards_reason",
    "linear_scaling",
    "mlperf_resnet50_lars",
    "sqrt_scaling",
]

Decay = Literal["poly", "cosine", "step", "constant"]
DECAYS = ("poly", "cosine", "step", "constant")
ORIGINS = ("warmup_end", "zero")


@dataclass(frozen=True)
class WarmupDecay:
    """Linear warm-up from ``warmup_start_lr`` to ``base_lr`` over ``warmup_steps``, then decay.

    ``schedule(step)`` is the rate for the update made at ``step`` (0-based). After
    ``total_steps`` the rate stays at its final value. ``decay``:

    - ``poly``: end + (base - end) * (1 - s/S)^power, with s, S counted from the end of warm-up
      (``decay_origin="warmup_end"``) or from step 0 (``"zero"``, Intel Caffe as released);
    - ``cosine``: end + (base - end) * (1 + cos(pi * s/S)) / 2;
    - ``step``: base * gamma^(number of milestones passed), milestones in global steps;
    - ``constant``: base.
    """

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    decay: Decay = "poly"
    power: float = 2.0
    end_lr: float = 0.0
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    decay_origin: Literal["warmup_end", "zero"] = "warmup_end"

    def __post_init__(self) -> None:
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise ValueError(f"base_lr must be finite and > 0, got {self.base_lr}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}"
            )
        if self.warmup_start_lr < 0 or self.end_lr < 0:
            raise ValueError("warmup_start_lr and end_lr must be >= 0")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}; got {self.decay!r}")
        if self.decay_origin not in ORIGINS:
            raise ValueError(f"decay_origin must be one of {', '.join(ORIGINS)}; got {self.decay_origin!r}")
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}")
        backwards = self.backwards()
        if backwards:
            raise ValueError(backwards)
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError(f"milestones must be increasing, got {list(self.milestones)}")

    def backwards(self) -> str | None:
        """Why the rate would rise where it should fall (warm-up down, decay up), or None."""
        return backwards_reason(self.base_lr, self.warmup_start_lr if self.warmup_steps else 0.0,
                                self.end_lr if self.decay in ("poly", "cosine") else 0.0,
                                self.gamma if self.decay == "step" else 1.0)

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_start_lr + (self.base_lr - self.warmup_start_lr) * frac
        step = min(step, self.total_steps)
        if self.decay == "constant":
            return self.base_lr
        if self.decay == "step":
            passed = sum(1 for m in self.milestones if step >= m)
            return self.base_lr * self.gamma**passed
        origin = self.warmup_steps if self.decay_origin == "warmup_end" else 0
        span = self.total_steps - origin
        progress = (step - origin) / span if span > 0 else 1.0
        if self.decay == "poly":
            shape = (1.0 - progress) ** self.power
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.end_lr + (self.base_lr - self.end_lr) * shape

    def multiplier(self, step: int) -> float:
        """The rate relative to ``base_lr``: the factor ``LambdaLR`` expects."""
        return self(step) / self.base_lr

    def lambda_lr(
        self, optimizer: torch.optim.Optimizer, last_epoch: int = -1
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` stepping this schedule; the optimizer's lr must be ``base_lr``."""
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            if abs(float(group["initial_lr"]) - self.base_lr) > 1e-12 * self.base_lr:
                raise ValueError(
                    f"optimizer lr {group['initial_lr']} differs from the schedule's base_lr "
                    f"{self.base_lr}; LambdaLR multiplies the optimizer's lr"
                )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.multiplier, last_epoch=last_epoch)


SCHEDULE_NAMES = ("base_lr", "warmup_start_lr", "end_lr", "gamma")


def backwards_reason(peak: float, warmup_start: float, end: float, gamma: float,
                     names: tuple[str, ...] = SCHEDULE_NAMES) -> str | None:
    """Why a schedule runs backwards, naming the settings as ``names`` call them, or None.

    A warm-up starts at or below the peak, a decay ends at or below it, a step decay's factor is
    at most 1; the other way round trains at rates nobody meant, silently.
    """
    lr, start, end_name, gamma_name = names
    if warmup_start > peak:
        return f"{start} {warmup_start:g} is above the peak {lr} {peak:g}: the warm-up would go down"
    if end > peak:
        return f"{end_name} {end:g} is above the peak {lr} {peak:g}: the decay would go up"
    if gamma > 1:
        return f"{gamma_name} {gamma:g} is above 1: the step decay would raise the rate"
    return None


def linear_scaling(base_lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """Goyal et al.: lr grows in proportion to the batch, lr = base * B / B_ref."""
    _check_batches(batch_size, reference_batch)
    return base_lr * batch_size / reference_batch


def sqrt_scaling(base_lr: float, batch_size: int, reference_batch: int = 256) -> float:
    """Square-root rule (Krizhevsky 2014; Hoffer et al. 2017): lr = base * sqrt(B / B_ref)."""
    _check_batches(batch_size, reference_batch)
    return base_lr * math.sqrt(batch_size / reference_batch)


def _check_batches(batch_size: int, reference_batch: int) -> None:
    if batch_size < 1 or reference_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {reference_batch}")


def mlperf_resnet50_lars(global_batch: int, steps_per_epoch: int, epochs: int = 90) -> WarmupDecay:
    """The MLPerf ResNet-50 reference schedule for LARS, keyed on the global batch.

    Base 10 below 16K, 25 below 32K, 31.2 from 32K; warm-up 5, 5 and 25 epochs; poly power 2
    from the end of warm-up to 1e-4.
    """
    if global_batch < 1 or steps_per_epoch < 1 or epochs < 1:
        raise ValueError("global_batch, steps_per_epoch and epochs must be >= 1")
    if global_batch < 16_384:
        base, warmup_epochs = 10.0, 5
    elif global_batch < 32_768:
        base, warmup_epochs = 25.0, 5
    else:
        base, warmup_epochs = 31.2, 25
    total = epochs * steps_per_epoch
    return WarmupDecay(
        base_lr=base,
        total_steps=total,
        warmup_steps=min(warmup_epochs * steps_per_epoch, total),
        decay="poly",
        power=2.0,
        end_lr=1e-4,
    )
