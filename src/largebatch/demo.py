"""The embedded default recipe: Fashion-MNIST, a small CNN, LARS at global batch 8192.

Warm-up then poly(2) decay, as in the paper, sized to finish on a 2-core CPU in a few minutes.
"""

from __future__ import annotations

from largebatch.config import TrainConfig, load_config

DEMO_OVERRIDES = {
    "model.name": "fmnist_net",
    "model.options": {"width": 32},
    "data.name": "fashion_mnist",
    "batch_size": 8192,
    "epochs": 20,
    "optim.name": "lars",
    "optim.lr": 10.0,
    "optim.trust_coefficient": 0.001,
    "optim.weight_decay": 5e-4,
    "optim.momentum": 0.9,
    "schedule.warmup_epochs": 3.0,
    "schedule.decay": "poly",
    "schedule.power": 2.0,
    "eval_every": 5,
}


def demo_config(out: str = "runs/demo", epochs: int | None = None, data_dir: str | None = None,
                progress: bool = True) -> TrainConfig:
    overrides = dict(DEMO_OVERRIDES, out=out, progress=progress)
    if epochs is not None:
        overrides["epochs"] = epochs
        overrides["schedule.warmup_epochs"] = min(DEMO_OVERRIDES["schedule.warmup_epochs"], float(epochs))
    if data_dir is not None:
        overrides["data.root"] = data_dir
    return load_config(None, list(overrides.items()))
