"""The process group from the launcher's environment (torchrun, else Slurm's srun); a plain process is a world of one.

Nothing here is home-made: torch.distributed (gloo on CPU, NCCL on GPU) does the work. This
module only decides the launcher, device and backend, and reduces metric tensors across ranks.

Launchers, first match wins:
- torchrun (also ``srun torchrun``, one task per node): its RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR and MASTER_PORT.
- Slurm (``srun python -m largebatch.cli ...``, one task per process): rank SLURM_PROCID, world
  SLURM_STEP_NUM_TASKS, local rank SLURM_LOCALID; the rendezvous host is the first node of the
  step (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST) and the port follows from the job id, so
  every task finds it without talking first. MASTER_ADDR / MASTER_PORT in the environment win.
- neither: one process.
"""

from __future__ import annotations

import datetime
import gc
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from largebatch.errors import UserError

__all__ = [
    "DistEnv",
    "Launch",
    "LaunchError",
    "all_reduce_sum",
    "any_rank_max",
    "broadcast_object",
    "choose_device",
    "compress_gradients",
    "detect_launch",
    "first_host",
    "host_group",
    "init_distributed",
    "shutdown",
    "slurm_port",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    launcher: str = "single process"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(preference: str, local_rank: int) -> torch.device:
    """cpu, or this process's GPU (local rank modulo the GPUs on the host)."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device=cuda was asked for, but this machine has no CUDA device; "
                        "use --device cpu or --device auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


class LaunchError(UserError, RuntimeError):
    """The launcher's environment does not describe a usable world (a job script's mistake)."""


@dataclass(frozen=True)
class Launch:
    """Who started this process, and its place in the world."""

    launcher: str  # "torchrun", "slurm" or "single process"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None = None
    master_port: int | None = None
    detail: str = ""  # for the run's first line

    def describe(self) -> str:
        return f"{self.launcher} ({self.detail})" if self.detail else self.launcher


SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 15000  # 15000-29999: below Linux's ephemeral ports (32768-)


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a Slurm job: the same in every task and every requeue of the job."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[07-09,12],gpu3`` -> ``node07``), as
    ``scontrol show hostnames`` would print it first; every bracket takes its first value."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    if not first or first.count("[") != first.count("]"):
        raise LaunchError(f"cannot read the Slurm node list {nodelist!r}")
    return re.sub(r"\[([^],-]+)[^]]*\]", r"\1", first)


def _tasks_on_node(tasks_per_node: str, node: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE (``2(x3),1``) read for one node index."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise LaunchError(f"cannot read SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    if node >= len(counts):
        raise LaunchError(f"SLURM_NODEID {node} is beyond SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node]


def _int(env: Mapping[str, str], key: str, default: str | None = None) -> int:
    value = env.get(key, default)
    if value is None:
        raise LaunchError(f"{key} is not set")
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{key}={value!r} is not an integer") from None


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """The launcher and this process's place in the world, from the environment alone.

    Inside a Slurm job but outside a job step (the batch script itself) with more than one task, a
    lone process would wait forever for peers that were never started: refused, naming srun.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "TORCHELASTIC_RUN_ID" in env:
        world = _int(env, "WORLD_SIZE", "1")
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "environment (RANK/WORLD_SIZE)"
        return Launch(launcher, _int(env, "RANK"), world, _int(env, "LOCAL_RANK", "0"),
                      _int(env, "LOCAL_WORLD_SIZE", str(world)), env.get("MASTER_ADDR"),
                      _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None)
    if "SLURM_JOB_ID" not in env:
        return Launch("single process", 0, 1, 0, 1)
    job = env["SLURM_JOB_ID"]
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env:  # the batch script itself, not a job step
        tasks = _int(env, "SLURM_NTASKS", "1")
        if tasks > 1:
            raise LaunchError(f"Slurm job {job} has {tasks} tasks but this process was not started by srun; "
                              "start the trainer with `srun python -m largebatch.cli train ...`")
        return Launch("single process", 0, 1, 0, 1, detail=f"in Slurm job {job}")
    world = _int(env, "SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    rank = _int(env, "SLURM_PROCID")
    job_tasks = _int(env, "SLURM_NTASKS", str(world))
    if not 0 <= rank < world:
        raise LaunchError(f"SLURM_PROCID={rank} is outside the job step's {world} task(s)")
    if world < job_tasks:
        raise LaunchError(f"this job step has {world} task(s) but Slurm job {job} has {job_tasks}; "
                          f"run `srun` without -n/--ntasks (or with --ntasks={job_tasks}) so every task trains")
    local_world = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", str(world)), _int(env, "SLURM_NODEID", "0"))
    addr = env.get("MASTER_ADDR")
    if not addr and world > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("no rendezvous host: neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST nor "
                              "MASTER_ADDR is set")
        addr = first_host(nodelist)
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else slurm_port(job)
    detail = f"job {job} step {env['SLURM_STEP_ID']}, {world} task(s)"
    if world > 1:
        detail += f", rendezvous {addr}:{port}"
    return Launch("slurm", rank, world, _int(env, "SLURM_LOCALID", "0"), local_world, addr, port, detail)


def init_distributed(device_preference: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group that the launcher (torchrun or Slurm) describes in the environment, if any.

    Under Slurm the torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) are
    set from it, so that everything downstream reads one convention.
    """
    launch = detect_launch()
    if launch.launcher == "slurm":
        os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                          LOCAL_RANK=str(launch.local_rank), LOCAL_WORLD_SIZE=str(launch.local_world_size))
        if launch.world_size > 1:
            os.environ.update(MASTER_ADDR=str(launch.master_addr), MASTER_PORT=str(launch.master_port))
    world, rank, local_rank = launch.world_size, launch.rank, launch.local_rank
    local_world = launch.local_world_size
    device = choose_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout, store=_attempt_store(rank, world, timeout),
                                rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, local_world, device, launch.describe())


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this launch attempt.

    After a restart (``torchrun --max-restarts``) the agent's store still holds the addresses the
    previous attempt's processes published; a new process can read a dead peer's address before
    the peer's successor overwrites it and then fail to connect (pytorch/pytorch#167288). A
    prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps the attempts apart.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
        is_master=rank == 0 and not agent_hosts_store, timeout=timeout, wait_for_workers=False,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"largebatch/attempt{attempt}", store)


def shutdown() -> None:
    """Leave the process group, after whatever still uses it is gone.

    A finished trainer can outlive its run in a reference cycle (bound methods of itself) until
    the interpreter exits; its DDP reducer then met a destroyed group during finalization, and
    the process aborted ("terminate called without an active exception"), which torchrun reports
    as a failed run. Collecting first frees it while the group still exists.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across ranks in place (no-op for a world of one); returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank_max(value: int, group: object | None = None) -> int:
    """The largest of every rank's small integer (a world of one: the value itself).

    A host-side collective: with ``group`` a gloo group it never waits for the device, so a
    CUDA step stays free of host syncs.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    flag = torch.tensor([value], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def host_group() -> object | None:
    """A gloo group over every rank for host-side flags: the default group on CPU, a new one beside NCCL.

    Every rank must call this at the same point (it is a collective when it creates a group).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    if dist.get_backend() == "gloo":
        return None  # the default group is already host-side
    return dist.new_group(backend="gloo")


def broadcast_object(obj: object, src: int = 0) -> object:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def compress_gradients(ddp_model: torch.nn.Module, grad_dtype: str) -> None:
    """All-reduce a DDP model's gradient buckets in ``grad_dtype`` ('fp32', 'bf16' or 'fp16').

    Half-precision buckets halve the bytes each all-reduce moves. torch's own communication hooks
    do it (cast the bucket, divide it by the world size, all-reduce it, cast it back to the gradients'
    dtype); fp32 keeps DDP's built-in all-reduce.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
    if grad_dtype == "fp32":
        return
    if grad_dtype not in hooks:
        raise ValueError(f"grad_dtype must be one of fp32, bf16, fp16; got {grad_dtype!r}")
    ddp_model.register_comm_hook(state=None, hook=hooks[grad_dtype])

