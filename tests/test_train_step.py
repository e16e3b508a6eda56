"""A training step without host synchronisation: the same results as a hand-written loop, no reads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.checkpoints import final_weights
from support.optim import NoHostSync
from support.runs import config_of, tiny_config

from largebatch.data.order import mix_seed
from largebatch.train_step import DivergenceGuard, step_seed
from largebatch.trainer import Trainer, _Window, build_optimizer, build_schedule


def test_step_seed_is_not_linear_in_rank_and_step():
    # the old seed, seed * 1_000_003 + rank * 10_007 + step, gave these two the same dropout masks
    assert step_seed(0, 1, 0) != step_seed(0, 0, 10_007)
    seeds = {step_seed(s, r, t) for s in range(3) for r in range(4) for t in range(2000)}
    assert len(seeds) == 3 * 4 * 2000
    assert step_seed(5, 2, 7) == mix_seed(5, 2, 7, 0x44524F50)  # the data order's mixing, its own tag
    assert 0 <= step_seed(2**40, 3, 10**9) < 2**63


def test_guard_names_the_first_bad_step_only_when_asked():
    guard = DivergenceGuard(torch.device("cpu"))
    ok, bad = torch.tensor(True), torch.tensor(False)
    guard.observe(0, torch.tensor(1.0), ok)
    assert guard.first_bad_step(never=100) is None
    guard.observe(1, torch.tensor(float("nan")), ok)
    guard.observe(2, torch.tensor(1.0), bad)  # a later bad step does not move the first
    guard.observe(3, torch.tensor(float("inf")), ok)
    assert guard.first_bad_step(never=100) == 1
    fresh = DivergenceGuard(torch.device("cpu"))
    fresh.observe(4, torch.tensor(0.5), bad)  # a non-finite gradient alone counts
    assert fresh.first_bad_step(never=100) == 4


@pytest.mark.parametrize("optimizer", ["lars", "lamb", "sgd"])
def test_a_normal_step_never_reads_the_device(tmp_path, optimizer):
    trainer = Trainer(config_of(tiny_config(tmp_path / "run", micro_batch=64, **{"optim.name": optimizer})))
    batches = trainer._batches()
    steps = [next(batches) for _ in range(3)]
    window = _Window(trainer.env.device)
    with NoHostSync():
        for micro in steps:
            loss, grad_ok = trainer.train_step(micro)
            trainer.guard.observe(trainer.step, loss, grad_ok)
            window.add(loss)
            trainer.step += 1
    assert trainer.guard.first_bad_step(never=trainer.total_steps) is None
    assert window.reduce(False)[0] > 0


def _hand_written_run(config) -> dict[str, torch.Tensor]:
    """The trainer's algorithm written plainly: float learning rate, one loop, nothing else."""
    trainer = Trainer(config)  # only for its data and freshly initialised model
    model, data = trainer.model, trainer.data
    spe = data.steps_per_epoch(config.batch_size)
    optimizer = build_optimizer(config, model, 0.0)
    schedule = build_schedule(config, spe)
    step = 0
    for epoch in range(config.epochs):
        for micro in data.train_batches(epoch, config.batch_size, config.micro_batch, 0, 1):
            torch.manual_seed(step_seed(config.seed, 0, step))
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
            optimizer.zero_grad(set_to_none=True)
            for x, y in micro:
                (F.cross_entropy(model(x), y) / len(micro)).backward()
            optimizer.step()
            step += 1
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_device_learning_rate_gives_the_hand_written_loops_weights(tmp_path, optimizer):
    overrides = {"micro_batch": 64, "optim.name": optimizer, "eval_every": 0}
    Trainer(config_of(tiny_config(tmp_path / "trainer", **overrides))).run()
    reference = _hand_written_run(config_of(tiny_config(tmp_path / "hand", **overrides)))
    weights = final_weights(tmp_path / "trainer")
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)  # bitwise: the same arithmetic
    start = Trainer(config_of(tiny_config(tmp_path / "fresh", **overrides))).model.state_dict()
    assert max((weights[k] - start[k]).abs().max().item() for k in weights) > 1e-3  # the runs did train


def test_learning_rate_tensor_survives_a_loaded_optimizer_state(tmp_path):
    trainer = Trainer(config_of(tiny_config(tmp_path / "run")))
    state = trainer.optimizer.state_dict()
    for group in state["param_groups"]:
        group["lr"] = 123.0  # what an older checkpoint holds
    trainer.optimizer.load_state_dict(state)
    trainer.learning_rate.set(0.25)
    assert all(g["lr"] is trainer.learning_rate.value for g in trainer.optimizer.param_groups)
    assert trainer.learning_rate.value.item() == 0.25
