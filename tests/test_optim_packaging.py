"""The base install is torch alone: largebatch.optim and largebatch.schedule import and step
without the `train` extra's packages (each made unimportable in a fresh interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ONLY = ("torchvision", "numpy", "yaml", "matplotlib")

SCRIPT = f"""
import sys
for name in {TRAIN_ONLY!r}:
    sys.modules[name] = None  # import now raises ImportError
import torch
from largebatch.optim import LARS, LAMB, variant
from largebatch.schedule import WarmupDecay
p = torch.nn.Parameter(torch.ones(3, 2))
for opt in (LARS([p], lr=0.1), LAMB([p], lr=0.1), variant("vicreg", [p], lr=0.1)):
    p.grad = torch.ones(3, 2)
    opt.step()
assert WarmupDecay(base_lr=1.0, warmup_start_lr=0.1, warmup_steps=2, total_steps=10)(1) > 0.1
print("ok")
"""


def test_optim_and_schedule_need_torch_alone():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_base_dependencies_are_torch_and_the_train_extra_has_the_rest():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0] for d in project["dependencies"]] == ["torch"]
    train = {d.split(">")[0] for d in project["optional-dependencies"]["train"]}
    assert train == {"torchvision", "numpy", "pyyaml", "matplotlib"}
    pinned = {line.split("==")[0].lower() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
              if "==" in line}
    assert train <= pinned  # `make setup` still installs everything the trainer needs
