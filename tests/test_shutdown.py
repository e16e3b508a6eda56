"""Leaving the process group: what still uses it goes first.

A finished Trainer can stay alive in a reference cycle (its own bound methods) until the
interpreter exits; under torchrun a rank whose DDP reducer met an already destroyed group during
finalization aborted after a finished run (seen after a --max-restarts restart), which torchrun
reports as a failure. shutdown() collects such garbage while the group still exists.
"""

from __future__ import annotations

import gc
import weakref

import torch.distributed as dist

from largebatch import distributed


class _Cyclic:
    def __init__(self) -> None:
        self.me = self  # freed only by the garbage collector, as a Trainer with bound methods of itself


def test_shutdown_frees_cyclic_garbage_before_leaving_the_group(tmp_path, monkeypatch):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    gc.disable()  # no collection may happen by chance in between
    try:
        ref = weakref.ref(_Cyclic())
        assert ref() is not None
        seen = {}
        real_destroy = dist.destroy_process_group

        def destroy(*args, **kwargs):
            seen["alive_at_destroy"] = ref() is not None
            return real_destroy(*args, **kwargs)

        monkeypatch.setattr(dist, "destroy_process_group", destroy)
        distributed.shutdown()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
    assert seen == {"alive_at_destroy": False}
