"""Float64 NumPy references written straight from the formulas in README.md.

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
