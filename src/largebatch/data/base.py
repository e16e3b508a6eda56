"""The protocol every dataset implements, and the error type for data a user got wrong."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from largebatch.data.order import epoch_permutation, eval_shard, plan_steps
from largebatch.errors import UserError

__all__ = ["Batch", "DataError", "DataSource"]

Batch = tuple[Tensor, Tensor]


class DataError(UserError, ValueError):
    """A data problem the user can fix (missing or corrupt file, bad option); the message is
    one line naming the path or value. A ValueError, so configuration handlers catch it too."""


class DataSource:
    """A dataset as the trainer sees it: sizes, and batches in the order of :mod:`.order`.

    Attributes: ``num_train``, ``num_eval``, ``num_classes``, ``input_shape`` (C, H, W) as the
    model sees it, ``device``, ``seed``. Batches are ``(x, y)``: x float32 normalised on
    ``device``, y int64 class indices on ``device``. ``eval_unavailable``: why there are no
    evaluation examples (e.g. a missing folder), or None.

    Subclasses implement :meth:`_train_micro` and :meth:`_eval_range` (in-memory sources), or
    override the iterators and read the same order from :meth:`_train_steps` and
    :meth:`_eval_ranges` (loader-driven sources, which queue it ahead).
    """

    num_train: int
    num_eval: int
    num_classes: int
    input_shape: tuple[int, int, int]
    device: torch.device
    seed: int
    eval_unavailable: str | None = None  # why num_eval is 0, where the source can say (one line)

    def steps_per_epoch(self, global_batch: int) -> int:
        """floor(num_train / global_batch): the last partial global batch is dropped."""
        if not isinstance(global_batch, int) or global_batch < 1:
            raise ValueError(f"global_batch must be a positive integer, got {global_batch!r}")
        return self.num_train // global_batch

    def train_batches(
        self, epoch: int, global_batch: int, micro_batch: int, rank: int, world: int, start_step: int = 0
    ) -> Iterator[list[Batch]]:
        """One item per global step from ``start_step``: this rank's list of micro-batches."""
        for state, micro in self._train_steps(epoch, global_batch, micro_batch, rank, world, start_step):
            yield [self._train_micro(indices, positions, state) for indices, positions in micro]

    def eval_batches(self, batch: int, rank: int, world: int) -> Iterator[Batch]:
        """This rank's contiguous shard of the evaluation set, in batches (the last may be
        short); across ranks every example appears exactly once."""
        for start, stop in self._eval_ranges(batch, rank, world):
            yield self._eval_range(start, stop)

    # the order, shared by every source (loader-driven ones read ahead from it)
    def _train_steps(
        self, epoch: int, global_batch: int, micro_batch: int, rank: int, world: int, start_step: int
    ) -> Iterator[tuple[object, list[tuple[Tensor, slice]]]]:
        """Each global step from ``start_step``: its :meth:`_begin_step` state and this rank's
        micro-batches as (example indices, positions within the global batch)."""
        plan, steps = plan_steps(self.num_train, global_batch, micro_batch, rank, world, start_step)
        perm = epoch_permutation(self.num_train, self.seed, epoch)
        for step in range(start_step, steps):
            base = step * global_batch
            micro = [(perm[base + a : base + b], slice(a, b)) for a, b in plan.micro_positions()]
            yield self._begin_step(epoch, step, global_batch), micro

    def _eval_ranges(self, batch: int, rank: int, world: int) -> list[tuple[int, int]]:
        """[start, stop) of each of this rank's evaluation batches, covering its shard in order."""
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"eval batch must be a positive integer, got {batch!r}")
        start, stop = eval_shard(self.num_eval, rank, world)
        return [(a, min(a + batch, stop)) for a in range(start, stop, batch)]

    # hooks
    def _begin_step(self, epoch: int, step: int, global_batch: int) -> object:
        """Per-step state shared by the step's micro-batches (e.g. augmentation draws for the
        whole global batch, indexed by position)."""
        return None

    def _train_micro(self, indices: Tensor, positions: slice, state: object) -> Batch:
        raise NotImplementedError

    def _eval_range(self, start: int, stop: int) -> Batch:
        raise NotImplementedError
