"""A run read back from disk: its checkpoints' weights and its metrics rows; and a pickle that
would run a command if a loader trusted it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from largebatch import checkpoint as ckpt

# wall-clock fields of a metrics row: they differ between two runs that compute the same thing
TIMING = {"img_per_s", "data_time_s", "elapsed_s"}


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's weights in one checkpoint file."""
    return ckpt.load_checkpoint(path)["model"]


def newest(run_dir: Path) -> Path:
    """The run's newest step checkpoint."""
    return ckpt.step_checkpoints(run_dir / "checkpoints")[-1]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights the run ended with (its newest step checkpoint)."""
    return weights(newest(run_dir))


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit: the same tensors under the same names."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timing fields: what two equal runs must agree on."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


class Exploit:
    """A pickle that would run a shell command when unpickled by a trusting loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
