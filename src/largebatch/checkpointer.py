"""When and where the trainer's state is written and read back; the file format is checkpoint.py.

The trainer decides *when* (its loop's ``should_checkpoint``); a :class:`Checkpointer` owns the
run's ``checkpoints/`` folder and *what* goes into it: the model, optimizer and loss-scaler state
it was given, the loop's counters (:class:`LoopState`) and what a resume needs to know about the
run (world size, micro-batch, CPU threads). Rank 0 writes; every rank learns the outcome, so all
ranks stop together on a failed write. Files are written, verified and pruned by
:mod:`largebatch.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from largebatch import checkpoint as ckpt
from largebatch import faults
from largebatch.config import ConfigError, TrainConfig, to_dict
from largebatch.distributed import DistEnv, broadcast_object
from largebatch.errors import first_line
from largebatch.rundir import RunDir


@dataclass
class LoopState:
    """The training loop's counters that a checkpoint holds beside the weights."""

    step: int = 0  # optimizer updates done
    best_top1: float = -1.0  # the best evaluation so far (best.pt holds its model)
    eval_pending: bool = False  # this step's evaluation was skipped by a stop: done first on resume


class Checkpointer:
    """The run's checkpoints: ``save`` on every rank (rank 0 writes), ``load`` to resume."""

    def __init__(self, run_directory: RunDir, config: TrainConfig, env: DistEnv, *, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, micro_batch: int,
                 accumulation: int, classes: list[str], notice: Callable[[str], None]) -> None:
        self.run_directory = run_directory
        self.directory = run_directory.checkpoints
        self.config = config
        self.env = env
        self.model = model
        self.optimizer = optimizer
        self.scaler = scaler
        self.micro_batch = micro_batch
        self.accumulation = accumulation
        self.classes = classes  # index -> name, for inference
        self.notice = notice

    def newest_step_file(self) -> Path | None:
        """The newest ``step_*.pt`` in the run's checkpoints (None before the first)."""
        steps = ckpt.step_checkpoints(self.directory)
        return steps[-1] if steps else None

    def _payload(self, loop: LoopState) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": loop.step,
            "best_top1": loop.best_top1,
            "world_size": self.env.world_size,
            "micro_batch": self.micro_batch,
            "threads": torch.get_num_threads() if self.env.device.type == "cpu" else None,
            "config": to_dict(self.config),
            "eval_pending": loop.eval_pending,
            "classes": list(self.classes),
        }

    def load(self, path: Path, total_steps: int) -> LoopState:
        """Put the model, optimizer and scaler back as ``path`` holds them; the loop's counters."""
        payload = ckpt.load_checkpoint(path, map_location=self.env.device)
        try:
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.scaler.load_state_dict(payload["scaler"])
            loop = LoopState(step=int(payload["step"]), best_top1=float(payload.get("best_top1", -1.0)),
                             eval_pending=bool(payload.get("eval_pending", False)))
        except (KeyError, RuntimeError, ValueError) as err:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this model/optimizer: "
                                       f"{first_line(err, 200)}") from None
        named = ckpt.step_of_name(path)
        if named is not None and named != loop.step:
            self.notice(f"checkpoint {path.name} holds step {loop.step}, not {named} (renamed?); "
                        f"resuming at step {loop.step}")
        if not (self.directory / "best.pt").exists():
            loop.best_top1 = -1.0  # a fork (or a run whose best.pt is gone) writes its own best.pt
        self._keep_threads(payload.get("threads"))
        if loop.step > total_steps:
            raise ConfigError(f"checkpoint {path} is at step {loop.step}, beyond this run's {total_steps} steps")
        if payload.get("world_size") != self.env.world_size:
            self.notice(
                f"resuming a run of world size {payload.get('world_size')} with {self.env.world_size}: "
                f"global batch kept at {self.config.batch_size}, accumulation now {self.accumulation}"
            )
        elif isinstance(payload.get("micro_batch"), int) and payload["micro_batch"] != self.micro_batch:
            self.notice(
                f"resuming a run of micro-batch {payload['micro_batch']} with {self.micro_batch}: "
                f"global batch kept at {self.config.batch_size}, accumulation now {self.accumulation}"
            )
        self.notice(f"resumed from {path} at step {loop.step}")
        return loop

    def _keep_threads(self, threads: Any) -> None:
        """A resumed CPU run keeps its thread count (results differ in the last bits with another)
        unless the config sets one; a set count that differs from the run's is announced."""
        now = torch.get_num_threads()
        if self.env.device.type != "cpu" or not isinstance(threads, int) or threads == now:
            return
        if self.config.threads is None:
            torch.set_num_threads(threads)
            self.notice(f"keeping the run's {threads} CPU thread(s) (this machine would use {now}; "
                        "set threads to change it)")
        else:
            self.notice(f"resuming a run of {threads} CPU thread(s) with {now}: "
                        "results may differ from an uninterrupted run in the last bits")

    def _agree(self, error: str | None) -> None:
        """Rank 0's write result, shared so that every rank stops together on a failed write."""
        error = broadcast_object(error)  # type: ignore[assignment]
        if error:
            raise ckpt.CheckpointError(error)

    def save(self, loop: LoopState, name: str | None = None) -> None:
        """Checkpoint ``loop.step`` as a step file (or as ``name``, e.g. best.pt); all ranks call it.

        A run whose directory was moved while it ran writes its step's checkpoint where the run
        now is (never re-creating the old path) and stops with a one-line error saying where.
        """
        error = None
        if self.env.is_main:
            directory = self.directory
            moved = self.run_directory.moved_to()
            if moved is not None:  # write where the run now is, never re-create the old path
                directory = moved / "checkpoints"
            try:
                if name is not None:
                    ckpt.save_checkpoint(directory / name, self._payload(loop))
                if name is None or moved is not None:  # a moved run stops with its step's checkpoint
                    step, rank = loop.step, self.env.rank
                    ckpt.save_checkpoint(ckpt.step_path(directory, step), self._payload(loop),
                                         before_commit=lambda: faults.maybe_kill("checkpoint", step, rank)
                                         or faults.maybe_pause("checkpoint", step, rank))
                    ckpt.prune(directory, self.config.keep_checkpoints)
            except ckpt.CheckpointError as err:
                error = str(err)
            if moved is not None and error is None:
                error = (f"run directory {self.run_directory.path} was moved to {moved} while the run ran; "
                         f"stopped at step {loop.step} with its checkpoint there; "
                         f"continue with --out {moved} --resume auto")
        self._agree(error)
