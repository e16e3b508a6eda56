"""The embedded default recipe: Fashion-MNIST, a small CNN, LARS at global batch 8192.

As in the paper: LARS on every layer (no exclusions), a linear warm-up, then poly(2) decay:
40 epochs, 280 steps; accuracy and time as measured are in docs/results/demo.md. The global batch is processed in
micro-batches of 128 with accumulation: twice as fast on this CPU as one pass of 8192 (the
activations stay in cache), and BatchNorm then normalises over 128 examples, the "ghost batch
norm" of Hoffer et al. that large-batch training benefits from. configs/fmnist_lars_8k.yaml
holds the same recipe.
"""

from __future__ import annotations

from largebatch.config import TrainConfig, load_config

DEMO_OVERRIDES = {
    "model.name": "fmnist_net",
    "model.options": {"width": 16},
    "data.name": "fashion_mnist",
    "data.augment": False,
    "batch_size": 8192,
    "micro_batch": 128,
    "epochs": 40,
    "optim.name": "lars",
    "optim.lr": 20.0,
    "optim.trust_coefficient": 0.001,
    "optim.weight_decay": 5e-4,
    "optim.momentum": 0.9,
    "optim.exclude_bias_and_norm": False,
    "schedule.warmup_epochs": 3.0,
    "schedule.decay": "poly",
    "schedule.power": 2.0,
    "eval_every": 10,
}


def demo_config(out: str = "runs/demo", epochs: int | None = None, data_dir: str | None = None,
                progress: bool = True) -> TrainConfig:
    """The demo's config; fewer ``epochs`` keep the recipe and shorten the warm-up to fit."""
    overrides = dict(DEMO_OVERRIDES, out=out, progress=progress)
    if epochs is not None:
        overrides["epochs"] = epochs
        overrides["schedule.warmup_epochs"] = min(DEMO_OVERRIDES["schedule.warmup_epochs"], epochs / 4)
    if data_dir is not None:
        overrides["data.root"] = data_dir
    return load_config(None, list(overrides.items()))
