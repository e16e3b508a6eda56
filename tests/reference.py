"""Float64 NumPy references written straight from the formulas: LARS as README.md states it (Intel
Caffe 1.0.7; sources in docs/paper.md), LAMB as You et al. 2020 ("Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", Algorithm 2) state it.

They share no code with largebatch.optim, so the tests compare two independent derivations.
"""

from __future__ import annotations

import math

import numpy as np


def lars_step(
    w: np.ndarray,
    g: np.ndarray,
    v: np.ndarray,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    eps: float,
    adapt: bool = True,
    clip: bool = False,
    nesterov: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One LARS update of one tensor; returns (new w, new v)."""
    w_norm = math.sqrt(float(np.sum(w * w)))
    g_norm = math.sqrt(float(np.sum(g * g)))
    if adapt and w_norm > 0 and g_norm > 0:
        r = eta * w_norm / (g_norm + weight_decay * w_norm + eps)
    else:
        r = 1.0
    if clip:
        r = min(r, 1.0)
    u = lr * r * (g + weight_decay * w)
    v_new = momentum * v + u
    if nesterov:
        return w - (u + momentum * v_new), v_new
    return w - v_new, v_new


def lamb_step(
    w: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    adapt: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One LAMB update (step t, 1-based); returns (new w, new m, new v)."""
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    u = m_hat / (np.sqrt(v_hat) + eps) + weight_decay * w
    w_norm = math.sqrt(float(np.sum(w * w)))
    u_norm = math.sqrt(float(np.sum(u * u)))
    r = w_norm / u_norm if (adapt and w_norm > 0 and u_norm > 0) else 1.0
    return w - lr * r * u, m, v


def lars_published_step(
    w: np.ndarray,
    g: np.ndarray,
    v: np.ndarray | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    eps: float,
    lr_in_momentum: bool,
    denominator: str,
    zero_norm: str,
    clip: bool | str,
    adapt: bool = True,
    adapt_without_decay: bool = True,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One step of LARS as the published codebases write it (docs/optimizers.md has the sources).

    ``v`` is None before the first step: as in torch's SGD, the first buffer is the step itself
    (no dampening). ``denominator``: "sum" = |g| + b|w| + e (paper, timm, LARC), "update" =
    |g + b w| + e (VICReg, optax, SimCLR, VISSL). ``zero_norm``: "unit" = ratio 1 and the decay
    kept (paper, timm, VICReg), "skip" = neither (lightly, solo-learn, LARC). ``clip``: True caps
    the ratio at 1, "larc" caps lr*ratio at lr (ratio/lr at 1). Returns (new w, new v).
    """
    decay = weight_decay
    ratio = 1.0
    if adapt and (weight_decay != 0 or adapt_without_decay):
        w_norm = math.sqrt(float(np.sum(w * w)))
        if denominator == "sum":
            other = math.sqrt(float(np.sum(g * g)))
            bottom = other + weight_decay * w_norm + eps
        else:
            dg = g + weight_decay * w
            other = math.sqrt(float(np.sum(dg * dg)))
            bottom = other + eps
        nonzero = w_norm > 0 and other > 0
        if nonzero or zero_norm == "unit":
            ratio = eta * w_norm / bottom if nonzero else 1.0
            if clip == "larc":
                ratio = min(ratio / lr, 1.0) if lr > 0 else 1.0
            elif clip:
                ratio = min(ratio, 1.0)
        else:
            decay = 0.0
    d = ratio * (g + decay * w)
    if lr_in_momentum:
        d = lr * d
    if momentum == 0:
        new_v, delta = None, d
    else:
        new_v = d.copy() if v is None else momentum * v + (1 - dampening) * d
        delta = d + momentum * new_v if nesterov else new_v
    return (w - delta if lr_in_momentum else w - lr * delta), new_v


def lamb_published_step(
    w: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    t: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    clip_divisor: float = 1.0,
    bias_correction: bool = True,
    adam_w_mode: bool = True,
    grad_averaging: bool = True,
    trust_clip: bool = False,
    adapt: bool = True,
    adapt_without_decay: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One LAMB step as apex's FusedLAMB kernel and timm's Lamb write it: the gradient divided by
    ``clip_divisor`` (max(global norm / max_grad_norm, 1)), L2 decay into the gradient when
    ``adam_w_mode`` is False, m accumulating g itself when ``grad_averaging`` is False."""
    g = g / clip_divisor
    if not adam_w_mode:
        g = g + weight_decay * w
    m = beta1 * m + ((1 - beta1) if grad_averaging else 1.0) * g
    v = beta2 * v + (1 - beta2) * g * g
    c1 = (1 - beta1**t) if bias_correction else 1.0
    c2 = (1 - beta2**t) if bias_correction else 1.0
    u = (m / c1) / (np.sqrt(v / c2) + eps)
    if adam_w_mode:
        u = u + weight_decay * w
    r = 1.0
    if adapt and (weight_decay != 0 or adapt_without_decay):
        w_norm = math.sqrt(float(np.sum(w * w)))
        u_norm = math.sqrt(float(np.sum(u * u)))
        if w_norm > 0 and u_norm > 0:
            r = w_norm / u_norm
        if trust_clip:
            r = min(r, 1.0)
    return w - lr * r * u, m, v
