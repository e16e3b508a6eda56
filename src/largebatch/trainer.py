"""The training loop: one program for one CPU process, one GPU, or many processes under torchrun.

Global batch = world size x micro-batch x accumulation steps. Gradients are averaged over the
global batch (each micro-batch's mean loss / accumulation, then DDP's mean over ranks), and DDP
all-reduces only on the last micro-batch of a step (``no_sync`` before), so results do not depend
on how the global batch is split. The learning rate is a pure function of the global step and
the data order a pure function of (seed, epoch, step); dropout is reseeded from (seed, rank,
step) each step. A checkpoint therefore needs only weights, optimizer state and the step count to
continue exactly as an uninterrupted run.

The loop reads as its phases: a step (device work only), the divergence guard (device flags),
then logging, evaluation and checkpoints, each decided by a small predicate. Only those last
three make the host wait for the device. On CUDA a step can be replayed as one captured graph
(``cuda_graphs``; see :mod:`largebatch.cuda_graph`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from largebatch import faults, stop_signals
from largebatch.checkpointer import Checkpointer, LoopState
from largebatch.config import ConfigError, TrainConfig, batch_plan
from largebatch.cuda_graph import GraphedStep, graphs_decision
from largebatch.data import DataSource, build_dataset
from largebatch.data.base import Batch
from largebatch.distributed import (
    DistEnv,
    all_reduce_sum,
    any_rank_max,
    compress_gradients,
    host_group,
    init_distributed,
)
from largebatch.errors import Preempted, UserError, first_line
from largebatch.metrics import MetricsWriter, Progress, RunRecordError, read_jsonl
from largebatch.models import build_model, check_input, model_options
from largebatch.optim import param_groups
from largebatch.optim._triton import TritonUnavailable
from largebatch.optimizer_table import OPTIMIZER_TABLE
from largebatch.plots import publish_plots
from largebatch.rundir import RunDir
from largebatch.schedule import WarmupDecay, linear_scaling, sqrt_scaling
from largebatch.train_step import DeviceLearningRate, DivergenceError, DivergenceGuard, grads_finite, step_seed


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    top1: float | None
    top5: float | None
    eval_loss: float | None
    wall_s: float
    already_finished: bool = False  # resumed with nothing left to train (the command line says so)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AMX), else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return torch.bfloat16 if amx() else None


def build_optimizer(config: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    o = config.optim
    groups = param_groups(
        model, o.weight_decay,
        exclude_from_adaptation=None if o.exclude_bias_and_norm else False,
        exclude_from_decay=None if o.exclude_bias_and_norm else False,
    )
    try:
        return OPTIMIZER_TABLE[o.name].build(groups, lr, o)
    except TritonUnavailable as err:  # an explicit triton path where it cannot run: the user's choice
        raise ConfigError(f"optim.implementation=triton cannot run here ({first_line(err)}); "
                          "set optim.implementation=auto") from None


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> WarmupDecay:
    s = config.schedule
    lr = config.optim.lr
    if s.scaling == "linear":
        lr = linear_scaling(lr, config.batch_size, s.reference_batch)
    elif s.scaling == "sqrt":
        lr = sqrt_scaling(lr, config.batch_size, s.reference_batch)
    total = config.epochs * steps_per_epoch
    return WarmupDecay(
        base_lr=lr, total_steps=total, warmup_steps=min(total, round(s.warmup_epochs * steps_per_epoch)),
        warmup_start_lr=s.warmup_start_lr, decay=s.decay, power=s.power, end_lr=s.end_lr,
        milestones=tuple(round(m * steps_per_epoch) for m in s.milestones), gamma=s.gamma,
        decay_origin=s.decay_origin,
    )


AMP_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # the names precision= takes
DIVERGED_EVAL_FACTOR = 100  # an eval loss above this many times ln(classes) is a diverged run
FEW_STEPS_PER_EPOCH = 4  # fewer steps than this per epoch: warm-up and decay have little room


class Trainer:
    """Sets a run up from a validated config and runs it. Only rank 0 writes or prints."""

    def __init__(self, config: TrainConfig, *, resume: str | None = None, overwrite: bool = False,
                 env: DistEnv | None = None) -> None:
        self.config = config
        self.env = env or init_distributed(config.device, timeout_s=config.dist_timeout_s)
        self.run_dir = Path(config.out)
        self.progress = Progress(0, enabled=config.progress, is_main=self.env.is_main)  # the progress line
        self.notice = self.progress.message  # a message line on rank 0 (clears the progress line first)
        self._stop_requested = False  # set by a stop signal (or a test) until the run ends
        self._stop_signal: int | None = None  # the first signal that asked for the stop
        self._interrupts = 0  # Ctrl-Cs seen: the second one stops at once
        stop_signals.requeue_signal()  # a bad LARGEBATCH_REQUEUE_SIGNAL is refused before anything is written
        self._host_group: object | None = None  # where ranks agree on the stop flag (host-side, gloo)

        self.micro_batch, self.accumulation = batch_plan(config, self.env.world_size)

        if self.env.device.type == "cpu":
            cores = os.cpu_count() or 1
            torch.set_num_threads(config.threads or max(1, cores // max(1, self.env.local_world_size)))
        else:
            torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once

        self.data: DataSource = build_dataset(
            config.data.name, root=config.data.root, device=self.env.device, seed=config.seed,
            augment=config.data.augment, model=config.model.name, **config.data.options,
        )
        self.steps_per_epoch = self.data.steps_per_epoch(config.batch_size)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"batch_size {config.batch_size} exceeds the training set ({self.data.num_train} examples)"
            )
        if self.data.num_classes < 2:
            raise ConfigError(f"the {config.data.name} data has {self.data.num_classes} class(es); "
                              "a classifier needs at least 2")
        if self.data.num_eval == 0 and config.eval_every:
            why = self.data.eval_unavailable or f"the {config.data.name} data has no evaluation examples (num_eval=0)"
            raise ConfigError(f"{why}; set eval_every=0 to train without evaluation")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.schedule = build_schedule(config, self.steps_per_epoch)

        torch.manual_seed(config.seed)
        model = build_model(config.model.name, num_classes=self.data.num_classes, **self._model_options())
        model = model.to(self.env.device)
        check_input(model, config.model.name, self.data.input_shape)
        self.channels_last = config.model.channels_last and len(self.data.input_shape) == 3
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the module whose state is saved
        self.optimizer = build_optimizer(config, model, self.schedule(0))
        tensor_lr = OPTIMIZER_TABLE[config.optim.name].tensor_lr
        self.learning_rate = DeviceLearningRate(self.optimizer, self.env.device, as_tensor=tensor_lr)
        self.amp_dtype = autocast_dtype(config.precision, self.env.device)
        self.scaler = torch.amp.GradScaler(
            self.env.device.type, enabled=self.amp_dtype == torch.float16
        )
        runner: nn.Module = torch.compile(model) if config.model.compile else model
        if self.env.distributed:
            runner = DDP(runner, device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None,
                         gradient_as_bucket_view=True)
            compress_gradients(runner, config.dist.grad_dtype)
        self.runner = runner
        self.guard = DivergenceGuard(self.env.device)
        self._step_fn = self._make_step_fn()
        self.graphed = isinstance(self._step_fn, GraphedStep)

        self.step = 0
        self.best_top1 = -1.0
        self._eval_pending = False  # this step's evaluation was skipped by a stop: done first on resume
        # only now, with data and model known to be usable, is the run directory touched
        self.run_dir_lifecycle = RunDir(self.run_dir, config, is_main=self.env.is_main, notice=self.notice)
        self.checkpointer = Checkpointer(
            self.run_dir_lifecycle, config, self.env, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
            micro_batch=self.micro_batch, accumulation=self.accumulation,
            classes=list(getattr(self.data, "classes", None) or []), notice=self.notice,
        )
        resume_path = self.run_dir_lifecycle.open(resume, overwrite)
        self.resumed = resume_path is not None
        try:  # from here to run()'s end, whatever is raised takes away what this run created
            if resume_path is not None:
                self._resume_from(resume_path)
            self.progress.total = self.total_steps
        except BaseException:
            self.run_dir_lifecycle.close(discard=True)
            raise

    def _model_options(self) -> dict[str, Any]:
        """The config's options, with the input's channels and size filled in where the model takes them."""
        options = dict(self.config.model.options)
        accepted = model_options(self.config.model.name)
        channels, height, _ = self.data.input_shape
        for key, value in (("in_channels", channels), ("image_size", height)):
            if key in accepted and key not in options:
                options[key] = value
        return options

    def _make_step_fn(self) -> Callable[[list[Batch]], tuple[torch.Tensor, torch.Tensor]]:
        """The eager step, or the same step captured as a CUDA graph where ``cuda_graphs`` allows it."""
        input_bytes = self.accumulation * self.micro_batch * (4 * math.prod(self.data.input_shape) + 8)
        use, self.graphs_reason = graphs_decision(
            self.config.cuda_graphs, device=self.env.device, distributed=self.env.distributed,
            fp16=self.scaler.is_enabled(), optimizer=self.config.optim.name, input_bytes=input_bytes,
            implementation=self.config.optim.implementation,  # config folds optim.fused into it
        )
        if not use:
            return self._eager_step
        on_failure = None
        if self.config.cuda_graphs == "auto":
            on_failure = lambda why: self.notice(f"cuda graphs off: capture failed ({why})")  # noqa: E731
        return GraphedStep(self._eager_step, self._step_state, on_failure=on_failure)

    # ---- run directory and checkpoints --------------------------------------------------------

    def _resume_from(self, path: Path) -> None:
        """Weights, optimizer and scaler from the checkpoint at ``path``; the loop continues at its step."""
        loop = self.checkpointer.load(path, self.total_steps)
        self.step, self.best_top1, self._eval_pending = loop.step, loop.best_top1, loop.eval_pending

    def save(self, name: str | None = None) -> None:
        """Checkpoint the current step (rank 0 writes), never a diverged model; all ranks call it."""
        self._check_finite()
        self.checkpointer.save(LoopState(self.step, self.best_top1, self._eval_pending), name)

    def _check_finite(self) -> None:
        """Read the divergence guard (one all-reduce, one host read): stop at the first bad step."""
        step = self.guard.first_bad_step(never=self.total_steps)
        if step is not None:
            kept = self.checkpointer.newest_step_file()
            where = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint had been written yet"
            # step + 1: the update counted as metrics.jsonl counts it (the first update is step 1)
            raise DivergenceError(
                f"non-finite loss or gradient at step {step + 1} (lr {self.schedule(max(step, 0)):.4g}); "
                f"stopped, {where}"
            )

    # ---- one step -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits under the run's autocast and memory format: the one forward of train and eval."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # a captured graph must not keep autocast's cast cache (its tensors would be freed under it)
        with torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None,
                            cache_enabled=not self.graphed):
            return self.runner(x).float()

    def train_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """One global step: (this rank's mean loss, all gradients finite) as device tensors, no host sync.

        Under CUDA graphs both are the graph's static outputs, overwritten by the next step.
        """
        self.runner.train()
        torch.manual_seed(step_seed(self.config.seed, self.env.rank, self.step))
        self.learning_rate.set(self.schedule(self.step))
        return self._step_fn(micro_batches)

    def _eager_step(self, micro_batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, backward and update: the part a CUDA graph captures (device work only)."""
        # zeroed in place, not freed: gradients keep their addresses, so the Triton optimizers'
        # address table is built once, and never during a CUDA graph's capture (docs/models_and_data.md)
        self.optimizer.zero_grad(set_to_none=False)
        total = torch.zeros((), device=self.env.device)
        last = len(micro_batches) - 1
        for i, (x, y) in enumerate(micro_batches):
            skip_allreduce = self.env.distributed and i < last  # DDP all-reduces on the last micro-batch
            with self.runner.no_sync() if skip_allreduce else contextlib.nullcontext():
                loss = F.cross_entropy(self.forward(x), y, label_smoothing=self.config.optim.label_smoothing)
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += loss.detach()
        self.scaler.unscale_(self.optimizer)
        if self.scaler.is_enabled():  # fp16 overflow is the scaler's business: it skips the step
            grad_ok = torch.ones((), dtype=torch.bool, device=self.env.device)
        else:  # otherwise a bad gradient is fatal
            grad_ok = grads_finite(list(self.model.parameters()), self.env.device)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total / len(micro_batches), grad_ok

    def _step_state(self) -> Iterator[torch.Tensor]:
        """Every tensor a step changes: parameters, buffers (BatchNorm statistics), optimizer state."""
        yield from self.model.parameters()
        yield from self.model.buffers()
        for state in self.optimizer.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.runner.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.env.device)  # loss, top1, top5, count, stopped
        topk = 5 if self.data.num_classes > 5 else 1
        for x, y in self.data.eval_batches(self.config.data.eval_batch, self.env.rank, self.env.world_size):
            faults.maybe_pause("eval", self.step, self.env.rank)
            if self._stop_requested:  # a stop does not wait for the evaluation: checked at each batch
                sums[4] = 1
                break
            logits = self.forward(x)
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            hits = logits.topk(topk, dim=1).indices == y[:, None]
            sums[1] += hits[:, 0].sum()
            sums[2] += hits.any(dim=1).sum()
            sums[3] += y.numel()
        all_reduce_sum(sums)
        loss, top1, top5, count, stopped = sums.tolist()
        if stopped:
            raise EvaluationStopped("a stop was requested during the evaluation")
        result = {"eval_loss": loss / count, "top1": 100.0 * top1 / count}
        result["top5"] = 100.0 * top5 / count if topk == 5 else None
        return result

    # ---- the loop -----------------------------------------------------------------------------

    def _end_of_epoch(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    def should_log(self) -> bool:
        """Every ``log_every`` steps and at the end of each epoch: the only steps that read the device."""
        return self.step % self.config.log_every == 0 or self._end_of_epoch()

    def should_evaluate(self) -> bool:
        """At the end of every ``eval_every``-th epoch and of the run; never with ``eval_every`` 0."""
        every = self.config.eval_every
        if every == 0 or not self._end_of_epoch():
            return False
        return (self.step // self.steps_per_epoch) % every == 0 or self.step == self.total_steps

    def should_checkpoint(self, stop: bool) -> bool:
        """Every ``checkpoint_every`` steps (0: each epoch's end), at the end of the run, and on a stop."""
        every = self.config.checkpoint_every
        periodic = self.step % every == 0 if every else self._end_of_epoch()
        return periodic or self.step == self.total_steps or stop

    def _batches(self) -> Iterator[list[Batch]]:
        """Each step's micro-batches from the current step to the end of the run, epoch after epoch."""
        cfg, env = self.config, self.env
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            yield from self.data.train_batches(
                epoch, cfg.batch_size, self.micro_batch, env.rank, env.world_size, start_step=in_epoch
            )

    def _request_stop(self, signum: int, frame: Any) -> None:
        """Signal handler: stop at the next step boundary with a checkpoint; a second Ctrl-C stops at once."""
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
        if not self._stop_requested:
            self._stop_signal = signum
        self._stop_requested = True

    def _stop_agreed(self) -> int:
        """Any rank's stop request as a code (0: none), the same on every rank.

        Called at every step boundary: one 4-byte host-side all-reduce (gloo) per step, nothing for
        a single process, and no wait for the device, so a stop is acted on at the next boundary.
        """
        code = stop_signals.stop_code(self._stop_signal) if self._stop_requested else stop_signals.StopCode.NONE
        return any_rank_max(code, self._host_group)

    def _interrupted_now(self) -> Preempted:
        newest = self.checkpointer.newest_step_file() if self.env.is_main else None
        return stop_signals.interrupted_now(self.step, self.run_dir, newest)

    def _report_lost_steps(self) -> None:
        """On resume: the steps logged after the checkpoint (a stop that came too late for a checkpoint)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.env.is_main or self.step == 0 or not path.is_file():
            return
        try:
            rows = [r for r in read_jsonl(path) if r.get("kind") == "train"]
        except (OSError, RunRecordError):
            return
        last = max((int(r.get("step", 0)) for r in rows), default=0)
        if last > self.step:
            self.notice(
                f"{last - self.step} step(s) logged after the checkpoint of step {self.step} were lost "
                f"(the run ended without a checkpoint of its last step); they are trained again"
            )

    def run(self) -> RunResult:
        t_start = time.perf_counter()
        writer: MetricsWriter | None = None
        start_step, finished = self.step, False
        last_eval: dict[str, Any] = {}
        stopping = contextlib.ExitStack()  # the stop-signal handlers, entered inside the try
        try:  # from here on, whatever is raised still closes the run directory (nothing left half-made)
            stopping.enter_context(stop_signals.installed(self._request_stop))
            self._announce()
            self._report_lost_steps()
            self._host_group = host_group()
            if self.env.is_main:
                writer = MetricsWriter(self.run_dir, resume_after_step=self.step if self.resumed else None,
                                       notice=self.notice)
            if self._eval_pending:  # the evaluation a stop skipped before this checkpoint
                self._eval_pending = False
                try:
                    last_eval = self._evaluate_and_keep_best(writer, time.perf_counter() - t_start)
                except EvaluationStopped:  # the step's checkpoint still says the evaluation is pending
                    raise stop_signals.stopped_error(self._stop_agreed(), self.step, self.run_dir) from None
            window = _Window(self.env.device)
            for micro, data_s in _timed(self._batches()):
                window.data_s += data_s
                lr = self.schedule(self.step)
                loss, grad_ok = self.train_step(micro)
                self.guard.observe(self.step, loss, grad_ok)
                window.add(loss)
                self.step += 1
                if self.step == start_step + 1:
                    self.run_dir_lifecycle.commit()  # no longer a refused run: what --overwrite replaced goes
                faults.maybe_kill("step", self.step, self.env.rank)
                faults.maybe_pause("step", self.step, self.env.rank)
                stop = records_failed = False
                if self.should_log():
                    stop, records_failed = self._log(writer, window, lr, time.perf_counter() - t_start)
                    window = _Window(self.env.device)
                stop = self._stop_agreed()  # every step boundary, not only log steps
                if self.should_evaluate():
                    try:
                        if stop:
                            raise EvaluationStopped
                        last_eval = self._evaluate_and_keep_best(writer, time.perf_counter() - t_start)
                    except EvaluationStopped:  # skipped or abandoned: the checkpoint says so, resume does it
                        stop, self._eval_pending = self._stop_agreed(), True
                    window.restart()
                if self.should_checkpoint(stop or records_failed):
                    self.save()
                    window.restart()
                if records_failed:
                    raise RunRecordError(self._records_failed_message(writer))
                if stop:
                    raise stop_signals.stopped_error(stop, self.step, self.run_dir)
            if writer is not None and writer.error is not None:  # the last row could not be written
                raise RunRecordError(self._records_failed_message(writer))
            finished = True
        except KeyboardInterrupt:  # a second Ctrl-C (a first one before the handlers were in place: plain)
            if not self._stop_requested:
                raise
            raise self._interrupted_now() from None
        finally:
            if not finished:  # a finished run keeps them over its plots (see plots.py)
                stopping.close()
            if writer:
                writer.close()
            if not finished:  # refused before its first step, or a user error before its first checkpoint:
                early = isinstance(sys.exc_info()[1], UserError) and not self.run_dir_lifecycle.wrote_checkpoint()
                self.run_dir_lifecycle.close(discard=self.step == start_step or early)  # what it created goes
        try:
            with stopping:
                if self.env.is_main:
                    publish_plots(self.run_dir, self.step, self.env.rank, self.notice)
        finally:
            self.run_dir_lifecycle.close()
        return RunResult(self.run_dir, self.step, last_eval.get("top1"), last_eval.get("top5"),
                         last_eval.get("eval_loss"), time.perf_counter() - t_start,
                         already_finished=self.resumed and start_step == self.total_steps)

    def _records_failed_message(self, writer: MetricsWriter | None) -> str:
        reason = writer.error if writer is not None else "rank 0 could not write the run records"
        return (f"{reason}; stopped at step {self.step} with its checkpoint in {self.run_dir / 'checkpoints'}; "
                "make room, then continue with --resume auto")

    def _announce(self) -> None:
        """The run's first line (what runs, on what input, how), and a warning for very few steps."""
        cfg, env = self.config, self.env
        shape = "x".join(str(n) for n in self.data.input_shape)
        graphs = f", cuda graphs {self.graphs_reason}" if env.device.type == "cuda" else ""
        self.notice(
            f"{cfg.model.name} on {cfg.data.name} (input {shape}): global batch {cfg.batch_size} = "
            f"{env.world_size} process(es) x {self.micro_batch} x {self.accumulation} accumulation, "
            f"{self.steps_per_epoch} steps/epoch, {self.total_steps} steps, {cfg.optim.name}, "
            f"peak lr {self.schedule.base_lr:.4g}, autocast {AMP_NAMES.get(self.amp_dtype, 'off')}, "
            f"device {env.device}{graphs}; launcher: {env.launcher}"
        )
        if self.steps_per_epoch < FEW_STEPS_PER_EPOCH:
            self.notice(
                f"warning: batch_size {cfg.batch_size} gives only {self.steps_per_epoch} step(s) per epoch of "
                f"{self.data.num_train} examples; warm-up and decay get little room (a smaller batch_size helps)"
            )

    def _log(self, writer: MetricsWriter | None, window: _Window, lr: float, elapsed: float) -> tuple[bool, bool]:
        """A log line: read the guard and the window (the host waits here).

        Returns (a rank asked to stop, rank 0 could not write its records), agreed by every rank.
        """
        self._check_finite()
        records_failed = writer is not None and writer.error is not None
        mean_loss, stop, records_failed = window.reduce(self._stop_requested, records_failed)
        epoch = (self.step - 1) // self.steps_per_epoch
        row = {
            "kind": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
            "lr": lr, "loss": mean_loss, "img_per_s": window.steps * self.config.batch_size / window.seconds(),
            "data_time_s": window.data_s, "elapsed_s": elapsed,
        }
        if writer:
            writer.write(row)
        self.progress.update(self.step, epoch, lr, mean_loss, row["img_per_s"])
        return stop, records_failed

    def _evaluate_and_keep_best(self, writer: MetricsWriter | None, elapsed: float) -> dict[str, Any]:
        result = self.evaluate()
        self._report_eval(writer, self.step // self.steps_per_epoch, result, elapsed)
        self._check_eval_loss(result["eval_loss"])
        if result["top1"] > self.best_top1:
            self.best_top1 = result["top1"]
            self.save("best.pt")
        return result

    def _check_eval_loss(self, loss: float) -> None:
        """Stop a run whose evaluation diverged, as a non-finite training loss does, before this
        model is saved. Guessing uniformly costs ln(classes); a loss 100 times that (logits in the
        hundreds, all wrong) or a non-finite one means the weights blew up."""
        limit = DIVERGED_EVAL_FACTOR * math.log(max(self.data.num_classes, 2))
        if not math.isfinite(loss) or loss > limit:
            raise DivergenceError(
                f"eval loss {loss:.4g} at step {self.step} (more than {DIVERGED_EVAL_FACTOR} x ln(classes) = "
                f"{limit:.4g}): the run diverged at lr {self.schedule(self.step - 1):.4g}; stopped without saving "
                f"this model; lower optim.lr (now {self.config.optim.lr:g})"
            )

    def _report_eval(self, writer: MetricsWriter | None, epochs_done: int, result: dict[str, Any],
                     elapsed: float) -> None:
        if writer is None:
            return
        writer.write({"kind": "eval", "step": self.step, "epoch": epochs_done, "elapsed_s": elapsed, **result})
        top5 = f" top-5 {result['top5']:.2f}%" if result["top5"] is not None else ""
        self.notice(
            f"epoch {epochs_done}: eval loss {result['eval_loss']:.4f} top-1 {result['top1']:.2f}%{top5}"
        )


def _timed(batches: Iterable[Any]) -> Iterator[tuple[Any, float]]:
    """Each item with the seconds spent waiting for it (the data loader's share of a step)."""
    iterator = iter(batches)
    while True:
        t0 = time.perf_counter()
        item = next(iterator, None)
        if item is None:
            return
        yield item, time.perf_counter() - t0


class _Window:
    """Loss and timing since the last log line; reduced across ranks with the stop flag."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.steps = 0
        self.data_s = 0.0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return max(time.perf_counter() - self.t0, 1e-9)

    def reduce(self, stop_requested: bool, records_failed: bool = False) -> tuple[float, bool, bool]:
        """(mean loss, any rank asked to stop, rank 0 could not write its records)."""
        one = torch.ones((), device=self.loss.device)
        flags = [one * float(stop_requested), one * float(records_failed)]
        stats = all_reduce_sum(torch.stack([self.loss, one, *flags]))
        loss_sum, ranks, stops, failed = stats.tolist()
        return loss_sum / ranks / max(self.steps, 1), stops > 0, failed > 0


class EvaluationStopped(Exception):
    """A stop was requested while evaluating: the evaluation is abandoned, the step is checkpointed."""


def train(config: TrainConfig, *, resume: str | None = None, overwrite: bool = False) -> RunResult:
    """Set up and run; the entry point of ``largebatch train`` and of the demo."""
    return Trainer(config, resume=resume, overwrite=overwrite).run()


__all__ = ["DivergenceError", "Preempted", "RunResult", "Trainer", "step_seed", "train"]
