"""One training step captured as a CUDA graph and replayed: one launch instead of thousands.

At small per-GPU batches a step is bound by kernel launches, not arithmetic; replaying a
captured graph removes the host from the step. What must stay true, and how:

- Inputs are copied into static buffers that the graph reads; outputs (loss, gradient
  finiteness) are static tensors that each replay overwrites.
- Warm-up runs a few real steps on a side stream (as CUDA graph capture requires: lazy state
  such as momentum buffers, cuDNN autotuning and compiled kernels are made before capture);
  the model and optimizer state are then put back exactly as they were, so the run is the same
  as one without graphs. State created during warm-up is zeroed, which is how largebatch's
  optimizers create it.
- The learning rate is a device tensor filled before each replay, and the dropout generator is
  reseeded before each replay (a replay reads the generator's current seed and offset); warm-up
  and capture leave the generators as they found them. Schedule and exact resume therefore work
  as without graphs.
- A new input signature (shapes, dtypes, number of micro-batches) captures anew.
- With ``cuda_graphs=auto`` a capture that fails (an operation a graph cannot hold) is reported
  in one line and the run goes on with eager steps; with ``on`` it is an error.

The capture backend is swappable so that the logic runs (and is tested) without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from largebatch.config import ConfigError
from largebatch.data.base import Batch
from largebatch.optimizer_table import OPTIMIZER_TABLE

StepFn = Callable[[Sequence[Batch]], tuple[Tensor, Tensor]]

WARMUP_STEPS = 3
MAX_STATIC_INPUT_BYTES = 2 << 30  # auto mode: at most this much for the step's static inputs
# a step replays as a graph only where the optimizer reads its learning rate from a device tensor
GRAPH_OPTIMIZERS = tuple(name for name, spec in OPTIMIZER_TABLE.items() if spec.tensor_lr)


def graphs_decision(mode: str, *, device: torch.device, distributed: bool, fp16: bool, optimizer: str,
                    input_bytes: int, implementation: str = "auto") -> tuple[bool, str]:
    """(use graphs?, why) for ``cuda_graphs`` = auto | on | off. ``on`` where it cannot work is an error.

    ``implementation`` is the optimizer's path: the compiled LARS path copies its hyper-parameters
    from pageable host memory at every step, which capture refuses (torch 2.14) or, captured,
    would replay from freed host memory."""
    if mode == "off":
        return False, "off"
    blocker = None
    if device.type != "cuda":
        blocker = "it needs a CUDA device"
    elif distributed:
        blocker = "it is not supported under DDP (several processes)"
    elif fp16:
        blocker = "fp16's gradient scaler reads the overflow flag on the host"
    elif optimizer not in GRAPH_OPTIMIZERS:
        blocker = f"optim.name={optimizer} reads its learning rate on the host (use {' or '.join(GRAPH_OPTIMIZERS)})"
    elif implementation == "compiled":
        blocker = ("optim.implementation=compiled copies its hyper-parameters from host memory at every step "
                   "(use triton or foreach)")
    if blocker is not None:
        if mode == "on":
            raise ConfigError(f"cuda_graphs=on cannot be used: {blocker}; set cuda_graphs=auto or off")
        return False, f"off: {blocker}"
    if mode == "auto" and input_bytes > MAX_STATIC_INPUT_BYTES:
        return False, f"off: the step's inputs ({input_bytes / 2**30:.1f} GiB) are too large to hold twice"
    return True, "on"


class CaptureBackend(Protocol):
    def warmup(self, fn: Callable[[], Any], steps: int) -> None: ...

    def capture(self, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Callable[[], None], tuple[Tensor, ...]]: ...


class CudaBackend:
    """torch.cuda graphs: warm-up on a side stream, capture into one graph, replay it."""

    def __init__(self) -> None:
        self.pool = None

    def warmup(self, fn: Callable[[], Any], steps: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(steps):
                fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Callable[[], None], tuple[Tensor, ...]]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the DataLoader's pin-memory thread (cudaHostAlloc, event queries) runs
        # during capture; in the default global mode its calls would invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = fn()
        self.pool = graph.pool()
        return graph.replay, outputs


class EagerBackend:
    """Stands in for CUDA graphs where there are none: replay runs the step again on the static
    buffers and writes its results into the static outputs. Used by tests of the capture logic."""

    def __init__(self) -> None:
        self.warmup_calls = 0
        self.captures = 0

    def warmup(self, fn: Callable[[], Any], steps: int) -> None:
        for _ in range(steps):
            fn()
            self.warmup_calls += 1

    def capture(self, fn: Callable[[], tuple[Tensor, ...]]) -> tuple[Callable[[], None], tuple[Tensor, ...]]:
        self.captures += 1
        outputs = tuple(t.clone() for t in fn())  # CUDA capture records without running: see restore

        def replay() -> None:
            for static, fresh in zip(outputs, fn(), strict=True):
                static.copy_(fresh)

        return replay, outputs


def _signature(batches: Sequence[Batch]) -> tuple:
    return tuple((x.shape, x.dtype, x.device, y.shape, y.dtype) for x, y in batches)


class GraphedStep:
    """Runs ``step_fn`` through a captured graph; call it like ``step_fn``.

    ``state`` lists what a step changes (parameters, buffers, optimizer state); it is called
    before and after warm-up so that warm-up leaves no trace.
    """

    def __init__(self, step_fn: StepFn, state: Callable[[], Iterable[Tensor]], *,
                 backend: CaptureBackend | None = None, warmup_steps: int = WARMUP_STEPS,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.step_fn = step_fn
        self.on_failure = on_failure  # None: a failed capture raises; else told why, then eager steps
        self.failed: str | None = None
        self.state = state
        self.backend = backend if backend is not None else CudaBackend()
        self.warmup_steps = warmup_steps
        self.static_inputs: list[Batch] = []
        self.outputs: tuple[Tensor, ...] = ()
        self._replay: Callable[[], None] | None = None
        self._signature: tuple | None = None

    @property
    def captured(self) -> bool:
        return self._replay is not None

    def __call__(self, batches: Sequence[Batch]) -> tuple[Tensor, Tensor]:
        if self.failed is not None:
            return self.step_fn(batches)
        if self._signature != _signature(batches):
            try:
                self._capture(batches)
            except RuntimeError as err:
                if self.on_failure is None:
                    raise
                self.failed = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                self.on_failure(self.failed)
                return self.step_fn(batches)
        for (static_x, static_y), (x, y) in zip(self.static_inputs, batches, strict=True):
            static_x.copy_(x)
            static_y.copy_(y)
        assert self._replay is not None
        self._replay()
        loss, grad_ok = self.outputs
        return loss, grad_ok

    def _capture(self, batches: Sequence[Batch]) -> None:
        self.static_inputs = [(x.clone(), y.clone()) for x, y in batches]
        saved = {id(t): (t, t.detach().clone()) for t in self.state()}
        run = lambda: self.step_fn(self.static_inputs)  # noqa: E731
        devices = sorted({x.device.index or 0 for x, _ in batches if x.device.type == "cuda"})
        # the generators as the caller seeded them, for the replay that follows (dropout masks)
        try:
            with torch.random.fork_rng(devices=devices):
                self.backend.warmup(run, self.warmup_steps)
                self._replay, self.outputs = self.backend.capture(run)
        finally:
            self._restore(saved)  # also after a failed capture: the eager step then starts clean
        self._signature = _signature(batches)

    @torch.no_grad()
    def _restore(self, saved: dict[int, tuple[Tensor, Tensor]]) -> None:
        for t in self.state():
            kept = saved.get(id(t))
            if kept is not None and kept[0] is t:
                t.copy_(kept[1])
            else:
                t.zero_()  # created during warm-up: largebatch optimizers start their state at zero


__all__ = ["CudaBackend", "EagerBackend", "GraphedStep", "graphs_decision"]
