"""README's "Use the optimizer in your own loop" snippet, executed exactly as written there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from largebatch.schedule import WarmupDecay

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    section = text[text.index("## Use the optimizer in your own loop"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the section should hold one python example"
    return blocks[0]


def test_readme_loop_runs_as_written_and_steps_the_schedule_once_per_update():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    loader = [(torch.randn(16, 4), torch.randint(0, 2, (16,))) for _ in range(12)]
    rates: list[float] = []

    def record(optimizer, args, kwargs):
        rates.append(float(optimizer.param_groups[0]["lr"]))

    namespace = {"model": model, "loader": loader, "loss_fn": torch.nn.functional.cross_entropy}
    handle = register_optimizer_step_pre_hook(record)
    try:
        exec(compile(_snippet(), str(README), "exec"), namespace)
    finally:
        handle.remove()
    sched = WarmupDecay(base_lr=33.0, warmup_start_lr=1.0, warmup_steps=400, total_steps=4000)
    assert sched(11) > sched(0)  # the rates differ from step to step: a stuck rate would show
    assert rates == pytest.approx([sched(step) for step in range(len(loader))], rel=1e-12)
    assert all(torch.isfinite(p).all() for p in model.parameters())
