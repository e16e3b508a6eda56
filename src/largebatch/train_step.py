"""The pieces of one training step that must not make the host wait for the device.

A step's loss and its finiteness stay device tensors until a log step reads them; the learning
rate reaches the optimizer as a 0-dim device tensor filled in place. Reading a value back to the
host (``item()``, ``bool()``, ``float()``, or copying a Python number to the GPU with
``torch.tensor``) stalls the launch queue, and at small per-GPU batches the queue is the bottleneck.
"""

from __future__ import annotations

import torch
from torch import Tensor

from largebatch.data.order import mix_seed
from largebatch.distributed import all_reduce_sum
from largebatch.errors import DivergenceError

# a tag that keeps the dropout stream apart from the data order's streams
DROPOUT = 0x44524F50


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed for a step's randomness (dropout): a function of the position, not of history.

    Mixed, not linear: (rank 1, step 0) and (rank 0, step 10007) must not share masks."""
    return mix_seed(seed, rank, step, DROPOUT)


class DivergenceGuard:
    """Counts non-finite steps on the device; only :meth:`first_bad_step` (log steps, saves) reads them.

    ``first`` is the earliest bad step on this rank (-1: none), so the error names where the run
    went wrong even when it is noticed several steps later.
    """

    def __init__(self, device: torch.device) -> None:
        self.bad = torch.zeros((), device=device)
        self.first = torch.full((), -1.0, device=device)

    def observe(self, step: int, loss: Tensor, grad_ok: Tensor) -> None:
        """Record step ``step``: device ops only, no host read."""
        step_bad = (~loss.isfinite()) | (~grad_ok)
        self.first = torch.where(step_bad & (self.first < 0), float(step), self.first)
        self.bad = self.bad + step_bad

    def first_bad_step(self, never: int) -> int | None:
        """All ranks together: None if every step so far was finite, else the earliest bad step."""
        if all_reduce_sum(self.bad.clone()).item() == 0:
            return None
        first = torch.where(self.first < 0, float(never), self.first)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        return int(first.item())


class DeviceLearningRate:
    """The learning rate as one 0-dim device tensor shared by every parameter group.

    Filling it in place costs one kernel and no host wait, and a captured CUDA graph reads the
    new value on each replay. torch.optim.SGD reads a tensor rate back with ``item()``, so for
    it the rate stays a Python float (a scalar argument, also free of waits).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, as_tensor: bool) -> None:
        self.optimizer = optimizer
        self.value: Tensor | None = torch.zeros((), device=device) if as_tensor else None

    def set(self, lr: float) -> None:
        if self.value is None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            return
        self.value.fill_(lr)
        for group in self.optimizer.param_groups:
            if group["lr"] is not self.value:  # a loaded state dict brings its own
                group["lr"] = self.value


def grads_finite(params: list[torch.nn.Parameter], device: torch.device) -> Tensor:
    """One device bool: every gradient is finite (one multi-tensor norm pass, no host read)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack(torch._foreach_norm(grads)).isfinite().all()


__all__ = ["DeviceLearningRate", "DivergenceError", "DivergenceGuard", "grads_finite", "step_seed"]
