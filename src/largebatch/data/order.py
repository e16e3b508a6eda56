"""The order of examples: a permutation from (seed, epoch), cut into global steps, sharded by rank.

Every data path uses these functions, so all of them honour the same contract:

- epoch e visits ``perm = epoch_permutation(n, seed, e)``; global step s takes
  ``perm[s*B:(s+1)*B]`` and the last partial global batch is dropped;
- rank r of w takes the r-th contiguous slice of B/w positions and splits it, in order, into
  micro-batches of b; so 2 ranks x b, 1 rank x 2 accumulation steps of b and 1 rank x 2b
  see the same examples in the same positions;
- evaluation gives rank r a contiguous, possibly uneven, shard: every example exactly once
  across ranks, no padding duplicates;
- everything is a pure function of its arguments, so a run resumed at step s gets exactly the
  batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AUGMENT",
    "PERMUTATION",
    "StepPlan",
    "epoch_permutation",
    "eval_shard",
    "mix_seed",
    "plan_steps",
    "step_generator",
]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (SplitMix64 chained): distinct tuples give unrelated
    streams, unlike ``seed + epoch``, where (0, 1) and (1, 0) would collide."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


# stream tags keep the permutation and the augmentation draws independent
PERMUTATION = 0x5045524D
AUGMENT = 0x41554720


def epoch_permutation(num: int, seed: int, epoch: int) -> Tensor:
    """The epoch's order: a CPU int64 permutation of range(num), seeded by (seed, epoch).

    Drawn on the CPU so that it is the same whatever device trains."""
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, PERMUTATION))
    return torch.randperm(num, generator=g)


def step_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The CPU generator for the augmentation draws of one global step (whole global batch)."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, step, AUGMENT))


@dataclass(frozen=True)
class StepPlan:
    """How one global batch is split: this rank's slice and its micro-batches (positions
    within the global batch, i.e. offsets from step * global_batch)."""

    global_batch: int
    micro_batch: int
    rank: int
    world: int

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.world

    @property
    def accumulation(self) -> int:
        return self.per_rank // self.micro_batch

    def micro_positions(self) -> list[tuple[int, int]]:
        """[(start, stop)) of each of this rank's micro-batches within the global batch."""
        base = self.rank * self.per_rank
        return [(base + i * self.micro_batch, base + (i + 1) * self.micro_batch) for i in range(self.accumulation)]


def plan_steps(
    num: int, global_batch: int, micro_batch: int, rank: int, world: int, start_step: int = 0
) -> tuple[StepPlan, int]:
    """Check the batch arithmetic and return (plan, steps per epoch).

    Raises ValueError naming the offending value when global_batch is not world x micro_batch x
    accumulation, the rank is out of range or start_step lies beyond the epoch."""
    for name, value in (("global_batch", global_batch), ("micro_batch", micro_batch), ("world", world)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank!r}")
    if global_batch % (world * micro_batch):
        raise ValueError(
            f"global_batch {global_batch} is not a multiple of world x micro_batch = {world} x {micro_batch}"
        )
    steps = num // global_batch
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step must be in [0, {steps}] for {num} examples at batch {global_batch}")
    return StepPlan(global_batch, micro_batch, rank, world), steps


def eval_shard(num: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous evaluation shard; sizes differ by at most one."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank!r}")
    return rank * num // world, (rank + 1) * num // world
