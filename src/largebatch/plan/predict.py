"""Iteration and time-to-train predictions for synchronous data-parallel SGD.

One iteration on p processes at global batch B (strong scaling: B fixed, b = B/p per process):

    compute  = b * 3 * F / R          F forward FLOPs per image, R sustained FLOP/s; backward ~ 2x forward
               (or t0 + b * t_img from a measured step-time fit, or b / images_per_s when a
               measured training throughput is given)
    update   = params * U / memory_bandwidth   the optimizer step, memory-bound (FLOP/s path only;
               a measured images/s already contains it)
    comm     = sum over gradient buckets of allreduce(bucket bytes), params * grad_bytes in all
               (4 for fp32 gradients, 2 for bf16/fp16)
    serial   = forward + backward + comm + update
    overlap  = forward + max(backward + comm(last bucket), comm) + update
    (a measured fixed cost per step is added to both, outside the overlap)

The overlapped form is the ideal bucketed schedule of DDP: buckets are all-reduced while
backward continues, but the last bucket can only start when backward ends. Scaling efficiency
is T(1) / (p T(p)) = compute / iteration time, since compute is linear in b and one process
does not communicate.

The measured step-time fit matters at small per-process batches: a fixed cost per step (kernel
launches, the optimizer) does not shrink with b, so strong scaling loses to it before the
network (see docs/planner.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from largebatch.plan.costs import allreduce_time, best_algorithm
from largebatch.plan.errors import PlanError
from largebatch.plan.hardware import Hardware
from largebatch.plan.model import Profile

__all__ = [
    "GRAD_BYTES",
    "IterationPrediction",
    "TrainingPrediction",
    "bucket_sizes",
    "comm_time",
    "iterations",
    "predict",
    "predict_iteration",
]

# bytes per all-reduced gradient element, by dtype
GRAD_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# the optimizer's memory traffic per parameter: LARS reads w, g, v and writes v, w (20 bytes),
# plus the two norms read w and g again (8 bytes)
UPDATE_BYTES = 28
# PyTorch DDP's default bucket_cap_mb
DEFAULT_BUCKET = 25 * 2**20


def iterations(epochs: float, dataset_size: int, global_batch: int, drop_last: bool = True) -> int:
    """Iterations to see ``epochs`` passes of the data.

    As largebatch's trainer runs them (``drop_last``): each epoch is floor(N / B) full batches,
    the partial last batch dropped. ``drop_last=False`` counts ceil(epochs * N / B), the
    paper's tables.
    """
    if epochs <= 0 or dataset_size <= 0 or global_batch <= 0:
        got = f"{epochs}, {dataset_size}, {global_batch}"
        raise PlanError(f"epochs, dataset size and global batch must be > 0, got {got}")
    if not drop_last:
        return math.ceil(epochs * dataset_size / global_batch - 1e-9)
    per_epoch = dataset_size // global_batch
    if per_epoch == 0:
        raise PlanError(f"global batch {global_batch} is larger than the data set ({dataset_size} images): "
                        "an epoch holds no full batch")
    return math.floor(epochs * per_epoch + 1e-9)


def bucket_sizes(total: float, bucket: float | None) -> list[float]:
    """Gradient bytes split as DDP does by size: full buckets, then the remainder."""
    if not bucket or bucket >= total:
        return [total]
    full = int(total // bucket)
    rest = total - full * bucket
    return [bucket] * full + ([rest] if rest > 0 else [])


def comm_time(hw: Hardware, processes: int, grad_bytes: float, algorithm: str = "best",
              bucket_bytes: float | None = DEFAULT_BUCKET) -> tuple[float, float, str]:
    """(total seconds, seconds of the last bucket, algorithm used for the largest bucket)."""
    sizes = bucket_sizes(grad_bytes, bucket_bytes)
    try:
        times = [allreduce_time(algorithm, processes, s, hw.links) for s in sizes]
        used = best_algorithm(processes, sizes[0], hw.links)[0] if algorithm == "best" else algorithm
    except ValueError as err:  # a hierarchical all-reduce on processes that do not fill whole nodes
        raise PlanError(f"{hw.name}: {err}") from None
    return sum(times), times[-1], used


@dataclass(frozen=True)
class IterationPrediction:
    processes: int
    per_process_batch: float
    forward_s: float
    backward_s: float
    update_s: float
    comm_s: float
    last_bucket_s: float
    algorithm: str
    fixed_s: float = 0.0  # measured cost per step whatever the batch (launches, optimizer); not overlapped

    @property
    def compute_s(self) -> float:
        """Forward, backward, optimizer update and fixed per-step cost: one process's work per step."""
        return self.forward_s + self.backward_s + self.update_s + self.fixed_s

    @property
    def serial_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def overlap_s(self) -> float:
        if self.processes == 1:
            return self.compute_s
        overlapped = self.forward_s + max(self.backward_s + self.last_bucket_s, self.comm_s)
        return overlapped + self.update_s + self.fixed_s

    def efficiency(self, overlap: bool = False) -> float:
        """T(1) / (p T(p)); the update and the fixed cost are per step, so they do not shrink with p."""
        work = self.forward_s + self.backward_s
        per_step = self.update_s + self.fixed_s
        return (work + per_step / self.processes) / (self.overlap_s if overlap else self.serial_s)


def predict_iteration(
    profile: Profile,
    hw: Hardware,
    processes: int,
    global_batch: int,
    *,
    algorithm: str = "best",
    bucket_bytes: float | None = DEFAULT_BUCKET,
    images_per_s: float | None = None,
    backward_ratio: float = 2.0,
    grad_bytes: int = GRAD_BYTES["fp32"],
) -> IterationPrediction:
    """One iteration's time split, from FLOPs and hardware.flops, or from a measured step.

    In order of preference: ``images_per_s`` given here, ``hw.step_time[profile.name]`` (fixed +
    per-image seconds), ``hw.images_per_s[profile.name]``, then FLOPs. The measured forms already
    include the optimizer step, so no update term is added to them.
    """
    if processes < 1 or int(processes) != processes:
        raise PlanError(f"process counts must be positive integers, got {processes}")
    if global_batch < processes:
        raise PlanError(f"global batch {global_batch} is smaller than {processes} processes: some would get no image")
    if global_batch % processes:
        raise PlanError(f"global batch {global_batch} does not divide among {processes} processes "
                        f"({global_batch / processes:.1f} images each)")
    if images_per_s is not None and not (math.isfinite(images_per_s) and images_per_s > 0):
        raise PlanError(f"images/s must be a finite number > 0, got {images_per_s}")
    b = global_batch / processes
    fit = hw.step_time.get(profile.name) if images_per_s is None else None
    if images_per_s is None and fit is None:
        images_per_s = hw.images_per_s.get(profile.name)
    fixed = 0.0
    if fit is not None:
        step, fixed = b * fit.per_image_s, fit.fixed_s
        update = 0.0
    elif images_per_s is not None:
        step = b / images_per_s
        update = 0.0
    else:
        if hw.flops is None:
            known = ", ".join(sorted(hw.images_per_s)) or "none"
            raise PlanError(
                f"hardware {hw.name!r} has no FLOP/s and no images/s for {profile.name!r} (measured: {known}); "
                f"give --images-per-s, or measure it: largebatch bench compute {profile.name} --yaml FILE"
            )
        step = b * (1 + backward_ratio) * profile.flops / hw.flops
        update = profile.params * UPDATE_BYTES / hw.memory_bandwidth if hw.memory_bandwidth else 0.0
    fwd = step / (1 + backward_ratio)
    if processes == 1:
        comm, last, used = 0.0, 0.0, "none"
    else:
        comm, last, used = comm_time(hw, processes, profile.params * grad_bytes, algorithm, bucket_bytes)
    return IterationPrediction(processes, b, fwd, step - fwd, update, comm, last, used, fixed)


@dataclass(frozen=True)
class TrainingPrediction:
    iteration: IterationPrediction
    iterations: int

    @property
    def processes(self) -> int:
        return self.iteration.processes

    def time_to_train(self, overlap: bool = False) -> float:
        it = self.iteration
        return self.iterations * (it.overlap_s if overlap else it.serial_s)


def predict(
    profile: Profile,
    hw: Hardware,
    processes: list[int],
    global_batch: int,
    epochs: float,
    dataset_size: int,
    **options,
) -> list[TrainingPrediction]:
    """Predictions for each process count; options as for :func:`predict_iteration`."""
    n_iter = iterations(epochs, dataset_size, global_batch)
    return [TrainingPrediction(predict_iteration(profile, hw, p, global_batch, **options), n_iter) for p in processes]
