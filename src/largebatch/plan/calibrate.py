"""Calibration of the planner (the `largebatch bench` command): measure all-reduce times and
training throughput on this machine, and fit the cost model's constants to them.

(The project's own speed measurements live in benchmarks/, not here.)

``measure_allreduce`` spawns local processes (torch.multiprocessing, gloo on CPU or NCCL on CUDA) that
rendezvous on a free port of 127.0.0.1 only, times all-reduces over a range of sizes, and
``fit_network`` recovers alpha and beta by weighted least squares on the chosen algorithm's
closed form. gamma cannot be separated from beta with one process count (both multiply n), so
it is measured apart, as the time of a local in-place add (``measure_gamma``), and subtracted
before the fit. ``measure_compute`` times whole training steps (forward, backward, SGD step) on
the GPU when there is one (bf16 autocast, channels_last), and ``fit_step_time`` fits the step
time at several batch sizes as a fixed cost per step plus a cost per image.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from largebatch.plan.costs import Network, allreduce_terms
from largebatch.plan.errors import PlanError
from largebatch.plan.hardware import StepTime

__all__ = [
    "CommFit",
    "calibration_device",
    "default_sizes",
    "device_name",
    "fit_network",
    "fit_step_time",
    "measure_allreduce",
    "measure_compute",
    "measure_compute_concurrent",
    "measure_gamma",
    "parse_batches",
    "parse_size",
    "resolve_model",
]

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}


def parse_size(text: str) -> int:
    """'256M' -> 268435456 (binary units: message sizes here are powers of two)."""
    s = str(text).strip().upper()
    num = s.rstrip("KMGB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        raise PlanError(f"not a size: {text!r} (examples: 1K, 64M, 1G)") from None
    if unit not in _UNITS or value <= 0:
        raise PlanError(f"not a size: {text!r} (examples: 1K, 64M, 1G)")
    return int(value * _UNITS[unit])


def default_sizes(lo: int = 2**10, hi: int = 2**28) -> list[int]:
    """Powers of four from lo to hi bytes (1 KB, 4 KB, ..., 256 MB by default)."""
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s *= 4
    if sizes[-1] != hi and hi > lo:
        sizes.append(hi)
    return sizes


def _reps(size: int, reps: int | None) -> int:
    # enough repetitions for a stable median, but about 64 MB of traffic per size at most
    return reps if reps else max(3, min(40, (64 * 2**20) // size))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm_worker(rank: int, world: int, port: int, backend: str, sizes: list[int], reps: int | None, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device(f"cuda:{rank}") if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        medians = []
        for size in sizes:
            buf = torch.ones(size // 4, dtype=torch.float32, device=device)
            dist.all_reduce(buf)  # warm-up: connections, buffers
            times = []
            for _ in range(_reps(size, reps)):
                dist.barrier()
                if backend == "nccl":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                if backend == "nccl":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times))
            del buf
        # the slowest rank decides, as in a training step
        result = torch.tensor(medians, dtype=torch.float64, device=device)
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
        if rank == 0:
            queue.put(result.cpu().tolist())
    finally:
        dist.destroy_process_group()


def measure_allreduce(processes: int = 2, sizes: Sequence[int] | None = None, reps: int | None = None,
               backend: str = "auto") -> tuple[str, list[int], list[float]]:
    """Median all-reduce seconds per size among local processes; returns (backend, sizes, times)."""
    import torch
    import torch.multiprocessing as mp

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= processes else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < processes:
        raise PlanError(f"nccl needs one GPU per process: {processes} processes, {torch.cuda.device_count()} GPUs")
    if backend not in ("gloo", "nccl"):
        raise PlanError(f"backend must be auto, gloo or nccl, got {backend!r}")
    if processes < 2:
        raise PlanError(f"an all-reduce benchmark needs at least 2 processes, got {processes}")
    sizes = list(sizes or default_sizes())
    if any(s < 4 or s % 4 for s in sizes):
        raise PlanError("sizes must be positive multiples of 4 bytes (float32 elements)")
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_comm_worker, args=(processes, _free_port(), backend, sizes, reps, queue),
                       nprocs=processes, join=True, start_method="spawn")
    return backend, sizes, queue.get()


def measure_gamma(sizes: Sequence[int] = (2**20, 2**22, 2**24, 2**26), reps: int = 9) -> float:
    """Seconds per byte reduced: the slope of the time of ``a += b`` (float32, one process) against bytes."""
    import torch

    times = []
    for size in sizes:
        a = torch.ones(size // 4)
        b = torch.ones(size // 4)
        a.add_(b)
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a.add_(b)
            runs.append(time.perf_counter() - t0)
        times.append(statistics.median(runs))
    slope, _ = np.polyfit(np.asarray(sizes, float), np.asarray(times, float), 1)
    return max(float(slope), 0.0)


@dataclass(frozen=True)
class CommFit:
    network: Network
    algorithm: str
    processes: int
    rel_residuals: tuple[float, ...]  # (model - measured) / measured, per size

    @property
    def max_rel_error(self) -> float:
        return max(abs(r) for r in self.rel_residuals)


def fit_network(sizes: Sequence[float], times: Sequence[float], processes: int, algorithm: str = "ring",
                gamma: float = 0.0) -> CommFit:
    """Weighted least squares for alpha and beta in t = m alpha + s beta + r gamma (gamma given).

    m, s, r are the algorithm's closed-form coefficients for each size; rows are divided by the
    measured time so that every size counts by its relative error (small messages fix alpha,
    large ones beta). A negative alpha or beta is refitted with that constant held at zero.
    """
    if len(sizes) != len(times) or len(sizes) < 2:
        raise PlanError("a fit needs at least two (size, time) pairs of equal number")
    terms = [allreduce_terms(algorithm, processes, n) for n in sizes]
    t = np.asarray(times, float)
    if (t <= 0).any():
        raise PlanError("measured times must be > 0")
    y = (t - gamma * np.array([c.bytes_reduced for c in terms])) / t
    x = np.array([[c.messages, c.bytes_sent] for c in terms]) / t[:, None]
    scale = np.array([1.0, 1e-9])  # condition the columns: alpha in s, beta in s per GB
    coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
    alpha, beta = coef / scale
    if alpha < 0 or beta < 0:
        col = 1 if alpha < 0 else 0
        only, *_ = np.linalg.lstsq(x[:, [col]], y, rcond=None)
        alpha, beta = (0.0, float(only[0])) if col == 1 else (float(only[0]), 0.0)
    net = Network(float(alpha), float(beta), float(gamma))
    res = tuple(float(c.time(net) / m - 1.0) for c, m in zip(terms, t, strict=True))
    return CommFit(net, algorithm, processes, res)


def parse_batches(text: str) -> list[int]:
    """'32,64,256' -> [32, 64, 256]: the per-process batches to time."""
    try:
        batches = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise PlanError(f"bad --batch {text!r}: give per-process batch sizes >= 1, e.g. 32 or 32,64,256")
    return batches


def fit_step_time(batches: Sequence[int], times: Sequence[float]) -> tuple[StepTime, list[float]]:
    """Least squares for t(b) = fixed_s + b * per_image_s; returns the fit and (model - measured) / measured.

    A negative fixed cost (noise on a nearly proportional line) is refitted through the origin.
    """
    if len(batches) != len(times) or len(set(batches)) < 2:
        raise PlanError("a step-time fit needs times at two different batch sizes or more")
    b = np.asarray(batches, float)
    t = np.asarray(times, float)
    (fixed, per_image), *_ = np.linalg.lstsq(np.c_[np.ones_like(b), b], t, rcond=None)
    if fixed < 0:
        fixed, per_image = 0.0, float(b @ t / (b @ b))
    if per_image <= 0:
        raise PlanError("the step time did not grow with the batch (noise larger than the work per image): "
                        "time larger batches, further apart, or more --steps")
    fit = StepTime(float(fixed), float(per_image), tuple(int(x) for x in batches))
    return fit, [fit.seconds(x) / y - 1.0 for x, y in zip(b, t, strict=True)]


def resolve_model(name: str, num_classes: int = 1000, image_size: int | None = None):
    """(model, input shape): from largebatch.models when it knows the name, else torchvision."""
    from largebatch import models

    if name in models.MODEL_NAMES:
        size = image_size or models.default_input_size(name)
        return models.build_model(name, num_classes), (1 if size <= 28 else 3, size, size)
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except ValueError:
        raise PlanError(f"unknown model {name!r} (neither largebatch.models nor torchvision knows it)") from None
    size = image_size or 224
    return net, (3, size, size)


def _compute_worker(rank: int, name: str, num_classes: int, image_size: int | None, batch: int, steps: int,
                    warmup: int, threads: int, barrier, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    model, shape = resolve_model(name, num_classes, image_size)
    if torch.cuda.is_available():  # one GPU per copy, as one process per GPU in a job
        model = model.to(torch.device("cuda", rank % torch.cuda.device_count()))
    barrier.wait()  # all copies build first, then run their steps at the same time
    queue.put(measure_compute(model, shape, batch, steps, warmup, None, num_classes))


def measure_compute_concurrent(name: str, processes: int, batch: int, steps: int = 10, warmup: int = 2,
                               threads: int | None = None, num_classes: int = 1000,
                               image_size: int | None = None) -> float:
    """Median step seconds of the slowest of ``processes`` copies training at once, no communication.

    The per-process rate of a data-parallel job is the rate with every process of the machine
    busy (shared memory bandwidth, clocks), which can be well below one process's rate alone.
    """
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // processes)
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.SimpleQueue(), ctx.Barrier(processes)
    mp.start_processes(_compute_worker, args=(name, num_classes, image_size, batch, steps, warmup, threads,
                                              barrier, queue), nprocs=processes, join=True, start_method="spawn")
    return max(queue.get() for _ in range(processes))


def calibration_device():
    """The first GPU when there is one (a process per GPU is what the planner describes), else the CPU."""
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def measure_compute(model, input_shape: tuple[int, ...], batch: int, steps: int = 10, warmup: int = 2,
                    threads: int | None = None, num_classes: int = 1000) -> float:
    """Median seconds of one training step (zero_grad, forward, loss, backward, SGD step) on synthetic data.

    Runs where the model is; on a GPU, with bf16 autocast and channels_last images, as training there runs.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    fmt = torch.channels_last if on_gpu and len(input_shape) == 3 else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, *input_shape, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (batch,), device=device)
    model.train()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
