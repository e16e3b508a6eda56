"""The Triton multi-tensor path of LARS and LAMB: tensor tables, their cache, and the launches.

Two launches per parameter group and dtype, whatever the number of tensors: one for the
per-chunk sums of squares, one for the update (LAMB: moments + sums, then the update); two more
when the group also holds tensors that forbid 128-bit access (an odd length), which get a table
of their own. The table of addresses is built once per set of tensors and reused while every
address stays the same (parameters and state buffers do not move; the trainer zeroes gradients
in place, so they do not move either; a gradient reallocated elsewhere rebuilds the table, which
is refused during CUDA graph capture). Launches run with the tensors' device current. Nothing
is read back to the host.

The update kernel's programs each add up their tensor's per-chunk sums (4 bytes a chunk): a
tensor of c chunks reads 4c bytes c times, against 16384 elements of its own data per program,
so that second pass stays under 1% of the traffic below ~1,200 chunks (20M elements) per tensor.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "BLOCK",
    "CHUNK",
    "INTERPRETER_BLOCK",
    "PBLOCK",
    "SUPPORTED_DTYPES",
    "Prepared",
    "Table",
    "Tables",
    "TritonUnavailable",
    "check_usable",
    "dense",
    "lamb_step",
    "lars_step",
    "prepare",
    "single_under_scaler",
    "split_flat",
    "take",
    "triton_installed",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
CHUNK = 16384  # elements per program: large tensors spread over many programs
BLOCK = 1024  # elements per vector operation inside a program
INTERPRETER_BLOCK = 4096  # on CPU, numpy's cost is per operation, not per element
PBLOCK = 64  # chunk sums added per vector operation in the second reduction


class TritonUnavailable(RuntimeError):
    """The Triton path was asked for where it cannot run."""


@functools.cache
def triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_usable(device: torch.device, owner: str) -> None:
    """Refuse, in one line, a Triton path that cannot run here (never replace it silently)."""
    if not triton_installed():
        raise TritonUnavailable(
            f"{owner}(implementation='triton') needs the triton package, which is not installed; "
            "use implementation='foreach'"
        )
    from largebatch.optim._triton_kernels import interpreting

    if device.type != "cuda" and not interpreting():
        raise TritonUnavailable(
            f"{owner}(implementation='triton') needs CUDA tensors (these are on {device}); "
            "set TRITON_INTERPRET=1 to run Triton's interpreter on CPU tensors, or use "
            "implementation='foreach'"
        )


def dense(t: Tensor) -> bool:
    """True when t covers exactly numel() consecutive elements (contiguous or a permutation)."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    return t.permute(order).is_contiguous()


def split_flat(columns: list[list[Tensor]]) -> tuple[list[int], list[int]]:
    """Indices of the tensors the kernels can address as flat memory, and of the others.

    ``columns`` are parallel lists of same-shaped tensors (parameter, gradient, buffers). A
    kernel walks their memory in order, so they must be dense and laid out alike (channels_last
    is fine when all of them are). The rare others take the single-tensor path.
    """
    flat, odd = [], []
    for i, p in enumerate(columns[0]):
        alike = all(col[i].shape == p.shape and col[i].stride() == p.stride() for col in columns)
        (flat if alike and dense(p) else odd).append(i)
    return flat, odd


def single_under_scaler(update: Any, grads: list[Tensor], state: list[Tensor],
                        grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Run ``update(grads)`` (a single-tensor path) as the kernels run under GradScaler.

    The optimizer told the scaler that it unscales and skips by itself, so the tensors the
    kernels cannot take (state laid out unlike the parameter, e.g. channels_last switched on
    resume) must do the same: gradients divided by the scale (in float32, as the kernels do),
    and on an overflow every tensor of ``state`` put back as it was, on the device (no host read).
    """
    if grad_scale is not None:
        inv = 1.0 / grad_scale.to(torch.float32)
        grads = [g.to(torch.float32) * inv for g in grads]
    saved = [t.clone() for t in state] if found_inf is not None else []
    update(grads)
    if found_inf is not None:
        skip = found_inf != 0
        for t, old in zip(state, saved, strict=True):
            t.copy_(torch.where(skip, old, t))


def take(items: list[Tensor], indices: list[int]) -> list[Tensor]:
    """items[i] for i in indices (the list itself when that is all of it)."""
    return items if len(indices) == len(items) else [items[i] for i in indices]


@dataclass
class Table:
    """A packed table on the device, with the scratch space of the per-chunk sums."""

    dtype: torch.dtype
    vec: int  # elements per 16-byte vector access, or 1 when an address or a length forbids it
    rows: Tensor  # int64 [tensors, columns + 3] on the device
    chunks: Tensor  # int64 [chunks, 2]: (tensor index, first element)
    partial_a: Tensor  # float32 [chunks]
    partial_b: Tensor
    n_chunks: int


def _build(columns: list[list[Tensor]], vec: int) -> Table:
    device = columns[0][0].device
    rows, chunks = [], []
    for i, p in enumerate(columns[0]):
        n = p.numel()
        count = -(-n // CHUNK)
        rows.append([col[i].data_ptr() for col in columns] + [n, len(chunks), count])
        chunks.extend([i, start] for start in range(0, n, CHUNK))
    host_rows = torch.tensor(rows, dtype=torch.int64)
    host_chunks = torch.tensor(chunks, dtype=torch.int64).reshape(-1, 2)
    if device.type == "cuda":  # pinned, so the copy is asynchronous
        host_rows, host_chunks = host_rows.pin_memory(), host_chunks.pin_memory()
    n_chunks = len(chunks)
    return Table(
        dtype=columns[0][0].dtype,
        vec=vec,
        rows=host_rows.to(device, non_blocking=True),
        chunks=host_chunks.to(device, non_blocking=True),
        partial_a=torch.empty(max(n_chunks, 1), dtype=torch.float32, device=device),
        partial_b=torch.empty(max(n_chunks, 1), dtype=torch.float32, device=device),
        n_chunks=n_chunks,
    )


@dataclass
class Tables:
    """The tables of one (group, device, dtype) bucket: the tensors that allow 128-bit access,
    and (only when there are any) the others. One odd-sized tensor (a 10-class bias) then costs
    its own small launch instead of dropping every tensor of the group to scalar access."""

    parts: list[Table]


def _vector_width(columns: list[list[Tensor]], i: int) -> int:
    """16 bytes' worth of elements when tensor i's addresses are 16-byte aligned and its length a
    multiple of it (the kernels then load and store 128 bits at a time), else 1."""
    vec = 16 // columns[0][0].element_size()
    aligned = all(col[i].data_ptr() % 16 == 0 for col in columns if col[i].dim() > 0)
    return vec if aligned and columns[0][i].numel() % vec == 0 else 1


def _build_tables(columns: list[list[Tensor]]) -> Tables:
    widths = [_vector_width(columns, i) for i in range(len(columns[0]))]
    parts = []
    for vec in sorted(set(widths), reverse=True):
        members = [i for i, w in enumerate(widths) if w == vec]
        parts.append(_build([take(col, members) for col in columns], vec))
    return Tables(parts)


@dataclass
class Prepared:
    """What one step of a (group, device, dtype) bucket needs, reused while no address changes."""

    addresses: tuple[int, ...]
    flat: list[int]  # indices of the tensors the kernels take
    odd: list[int]  # indices of the others (single-tensor path)
    table: Tables | None


def prepare(cache: dict, key: Any, columns: list[list[Tensor]], elementwise: int) -> Prepared:
    """The split into kernel/odd tensors and the packed table, from ``cache`` when every address
    (parameters, gradients, buffers) is the one it was built for: the per-step cost is then one
    ``data_ptr()`` per tensor. ``columns[:elementwise]`` have the parameters' shape and layout."""
    addresses = tuple(t.data_ptr() for col in columns for t in col)
    entry = cache.get(key)
    if entry is None or entry.addresses != addresses:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "the Triton optimizer's tensors moved during CUDA graph capture (its address table would be "
                "uploaded from host memory freed before the replay); keep gradients allocated across steps "
                "(zero_grad(set_to_none=False)) and run a step before capturing"
            )
        flat, odd = split_flat(columns[:elementwise])
        table = _build_tables([take(col, flat) for col in columns]) if flat else None
        entry = Prepared(addresses, flat, odd, table)
        cache[key] = entry
    return entry


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _block() -> int:
    from largebatch.optim._triton_kernels import interpreting

    return INTERPRETER_BLOCK if interpreting() else BLOCK


def _lr_args(lr: float | Tensor, device: torch.device, dummy: Tensor) -> tuple[Tensor, float, bool]:
    """(pointer, value, is_tensor): a device tensor is read by the kernel, anything else is a value."""
    if isinstance(lr, Tensor):
        if lr.device == device:
            return lr, 0.0, True
        return dummy, float(lr), False  # a CPU scalar read on the host: no device sync
    return dummy, float(lr), False


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: a model on cuda:1 must make it current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def lars_step(
    tab: Tables, *, has_momentum: bool, lr: float | Tensor, momentum: float, weight_decay: float,
    trust_coefficient: float, eps: float, nesterov: bool, clip: bool, adapt: bool,
    grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
) -> None:
    """One LARS update of the tensors of ``tab`` (one device and dtype), in two launches per table."""
    from largebatch.optim._triton_kernels import compiled

    for part in tab.parts:
        if part.n_chunks == 0:
            continue
        n_columns = 3 if has_momentum else 2
        common = dict(ROW=n_columns + 3, NUMEL=n_columns, DT=_tl_dtype(part.dtype), VEC=part.vec,
                      CHUNK=CHUNK, BLOCK=_block())
        grid = (part.n_chunks,)
        dummy = part.partial_a
        lr_ptr, lr_value, lr_is_tensor = _lr_args(lr, dummy.device, dummy)
        with _on_device(dummy.device):
            if adapt:
                compiled("lars_norms")[grid](part.rows, part.chunks, part.partial_a, part.partial_b, **common)
            compiled("lars_update")[grid](
                part.rows, part.chunks, part.partial_a, part.partial_b, lr_ptr, lr_value,
                grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
                float(momentum), float(weight_decay), float(trust_coefficient), float(eps),
                **common, PBLOCK=PBLOCK, HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov),
                ADAPT=bool(adapt), CLIP=bool(clip), LR_IS_TENSOR=lr_is_tensor,
                HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            )


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf


def lamb_step(
    tab: Tables, steps: list[Tensor], *, lr: float | Tensor, betas: tuple[float, float], eps: float,
    weight_decay: float, adapt: bool, grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
) -> None:
    """One LAMB update of the tensors of ``tab``: their step counts, then two launches per table
    (the kernels read each tensor's step count through the table)."""
    from largebatch.optim._triton_kernels import compiled

    torch._foreach_add_(steps, 1)
    b1, b2 = (float(b) for b in betas)
    for part in tab.parts:
        if not part.n_chunks:
            continue
        common = dict(ROW=5 + 3, NUMEL=5, DT=_tl_dtype(part.dtype), VEC=part.vec,
                      CHUNK=CHUNK, BLOCK=_block())
        grid = (part.n_chunks,)
        dummy = part.partial_a
        found = found_inf if found_inf is not None else dummy
        lr_ptr, lr_value, lr_is_tensor = _lr_args(lr, dummy.device, dummy)
        with _on_device(dummy.device):
            compiled("lamb_moments")[grid](
                part.rows, part.chunks, part.partial_a, part.partial_b,
                grad_scale if grad_scale is not None else dummy, found,
                b1, b2, _log2(b1), _log2(b2), float(eps), float(weight_decay),
                **common, HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            )
            compiled("lamb_update")[grid](
                part.rows, part.chunks, part.partial_a, part.partial_b, lr_ptr, lr_value, found,
                _log2(b1), _log2(b2), float(eps), float(weight_decay),
                **common, PBLOCK=PBLOCK, ADAPT=bool(adapt), LR_IS_TENSOR=lr_is_tensor,
                HAS_FOUND_INF=found_inf is not None,
            )
    if found_inf is not None:  # a skipped step does not count
        torch._foreach_sub_(steps, [found_inf.to(steps[0].dtype)] * len(steps))
