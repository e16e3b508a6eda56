"""The Checkpointer alone: what it saves is what it loads back, into fresh objects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from largebatch.checkpoint import CheckpointError, load_checkpoint, step_checkpoints
from largebatch.checkpointer import Checkpointer, LoopState
from largebatch.config import ConfigError, load_config
from largebatch.distributed import DistEnv
from largebatch.rundir import RunDir

ONE_PROCESS = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


def _checkpointer(tmp_path, model: nn.Module, notices: list[str]) -> Checkpointer:
    config = load_config(None, [("out", str(tmp_path / "run")), ("device", "cpu"), ("keep_checkpoints", 2)])
    run_directory = RunDir(config.out, config, is_main=True, notice=notices.append)
    run_directory.open(None, False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return Checkpointer(run_directory, config, ONE_PROCESS, model=model, optimizer=optimizer,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), micro_batch=8, accumulation=1,
                        classes=["a", "b"], notice=notices.append)


def _train_one_step(checkpointer: Checkpointer) -> None:
    loss = checkpointer.model(torch.ones(4, 3)).square().sum()
    loss.backward()
    checkpointer.optimizer.step()


def test_what_is_saved_loads_back_into_fresh_objects(tmp_path):
    torch.manual_seed(0)
    notices: list[str] = []
    saver = _checkpointer(tmp_path, nn.Linear(3, 2), notices)
    _train_one_step(saver)  # momentum buffers exist: optimizer state is more than the lr
    saver.save(LoopState(step=5, best_top1=40.0, eval_pending=True))
    saver.save(LoopState(step=7, best_top1=40.0, eval_pending=False), "best.pt")
    saver.run_directory.close()

    torch.manual_seed(1)  # different initial weights: loading must overwrite them
    loader = _checkpointer(tmp_path / "other", nn.Linear(3, 2), [])
    loader.directory = saver.directory  # read the first run's checkpoints
    path = step_checkpoints(saver.directory)[-1]
    loop = loader.load(path, total_steps=10)
    loader.run_directory.close()

    assert path.name == "step_00000005.pt"  # best.pt is not a step file
    assert loop == LoopState(step=5, best_top1=40.0, eval_pending=True)
    for a, b in zip(saver.model.parameters(), loader.model.parameters(), strict=True):
        assert torch.equal(a, b)
    saved = saver.optimizer.state_dict()["state"]
    loaded = loader.optimizer.state_dict()["state"]
    assert saved.keys() == loaded.keys() and saved
    for key in saved:
        assert torch.equal(saved[key]["momentum_buffer"], loaded[key]["momentum_buffer"])
    assert load_checkpoint(path)["classes"] == ["a", "b"]
    assert load_checkpoint(saver.directory / "best.pt")["step"] == 7


def test_a_fork_without_best_pt_starts_its_best_over(tmp_path):
    saver = _checkpointer(tmp_path, nn.Linear(3, 2), [])
    saver.save(LoopState(step=3, best_top1=55.0))  # a step file only, no best.pt beside it
    loop = saver.load(step_checkpoints(saver.directory)[-1], total_steps=10)
    saver.run_directory.close()
    assert loop.step == 3 and loop.best_top1 == -1.0


def test_refusals_are_one_line(tmp_path):
    saver = _checkpointer(tmp_path, nn.Linear(3, 2), [])
    saver.save(LoopState(step=12))
    path = step_checkpoints(saver.directory)[-1]
    with pytest.raises(ConfigError, match="beyond this run's 10 steps"):
        saver.load(path, total_steps=10)
    other = _checkpointer(tmp_path / "wider", nn.Linear(3, 5), [])
    with pytest.raises(CheckpointError, match="does not fit this model/optimizer") as err:
        other.load(path, total_steps=20)
    assert "\n" not in str(err.value)
    saver.run_directory.close()
    other.run_directory.close()
