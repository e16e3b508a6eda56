"""The process group from torchrun's environment; a plain process is a world of one.

Nothing here is home-made: torch.distributed (gloo on CPU, NCCL on GPU) does the work. This
module only decides the device and backend, and reduces metric tensors across ranks.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from largebatch.errors import UserError

__all__ = [
    "DistEnv", "all_reduce_sum", "broadcast_object", "choose_device", "compress_gradients", "init_distributed",
    "shutdown",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

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


def init_distributed(device_preference: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group that torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = choose_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout, store=_attempt_store(rank, world, timeout),
                                rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, local_world, device)


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

