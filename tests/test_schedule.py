"""Schedules against their formulas, and the LambdaLR adapter against the plain callable."""

from __future__ import annotations

import math

import pytest
import torch

from largebatch.schedule import WarmupDecay, linear_scaling, mlperf_resnet50_lars, sqrt_scaling


def test_paper_alexnet_bn_schedule_as_released():
    """Intel Caffe: warm-up 1 -> 33 over 400 iterations, then 33 * (1 - it/4000)^2 from it = 0."""
    s = WarmupDecay(base_lr=33.0, warmup_start_lr=1.0, warmup_steps=400, total_steps=4000, decay_origin="zero")
    assert s(0) == 1.0
    assert s(200) == pytest.approx(1.0 + 32.0 * 200 / 400)
    for it in (400, 1000, 2500, 3999):
        assert s(it) == pytest.approx(33.0 * (1 - it / 4000) ** 2, rel=1e-12)
    assert s(4000) == 0.0 and s(5000) == 0.0


def test_poly_from_warmup_end_is_continuous_and_reaches_end_lr():
    s = WarmupDecay(base_lr=10.0, warmup_steps=50, total_steps=250, power=2.0, end_lr=1e-4)
    assert s(49) < s(50) == pytest.approx(10.0)
    for step in (50, 120, 249):
        frac = (step - 50) / 200
        assert s(step) == pytest.approx(1e-4 + (10.0 - 1e-4) * (1 - frac) ** 2, rel=1e-12)
    assert s(250) == pytest.approx(1e-4)


def test_cosine_step_and_constant():
    cos = WarmupDecay(base_lr=2.0, warmup_steps=10, total_steps=110, decay="cosine")
    assert cos(60) == pytest.approx(1.0) and cos(110) == pytest.approx(0.0, abs=1e-15)
    assert cos(35) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    step = WarmupDecay(base_lr=1.0, total_steps=100, decay="step", milestones=(30, 60), gamma=0.1)
    assert [step(29), step(30), step(59), step(60), step(99)] == pytest.approx([1.0, 0.1, 0.1, 0.01, 0.01])
    assert WarmupDecay(base_lr=3.0, warmup_steps=4, total_steps=10, decay="constant")(7) == 3.0


def test_lambda_lr_follows_the_callable_step_by_step():
    s = WarmupDecay(base_lr=0.8, warmup_start_lr=0.1, warmup_steps=5, total_steps=20, power=3.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.8)
    sched = s.lambda_lr(opt)
    for step in range(25):
        assert opt.param_groups[0]["lr"] == pytest.approx(s(step), rel=1e-12)
        opt.step()
        sched.step()


def test_lambda_lr_refuses_a_different_base():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    with pytest.raises(ValueError, match="differs from the schedule's base_lr"):
        WarmupDecay(base_lr=1.0, total_steps=10).lambda_lr(opt)


def test_scaling_rules():
    assert linear_scaling(0.1, 8192) == pytest.approx(3.2)
    assert sqrt_scaling(0.1, 1024) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        linear_scaling(0.1, 0)


@pytest.mark.parametrize(
    "batch, base, warmup_epochs",
    [(8192, 10.0, 5), (16_384, 25.0, 5), (32_767, 25.0, 5), (32_768, 31.2, 25), (65_536, 31.2, 25)],
)
def test_mlperf_preset_is_keyed_on_batch(batch, base, warmup_epochs):
    steps_per_epoch = 1_281_167 // batch
    s = mlperf_resnet50_lars(batch, steps_per_epoch, epochs=90)
    assert s.base_lr == base and s.warmup_steps == warmup_epochs * steps_per_epoch
    assert s.total_steps == 90 * steps_per_epoch and s.end_lr == 1e-4 and s.power == 2.0
    assert s(s.total_steps) == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base_lr=0.0, total_steps=10), "base_lr must be finite and > 0"),
        (dict(base_lr=1.0, total_steps=0), "total_steps must be >= 1"),
        (dict(base_lr=1.0, total_steps=10, warmup_steps=11), "warmup_steps must be in"),
        (dict(base_lr=1.0, total_steps=10, decay="linear"), "decay must be one of"),
        (dict(base_lr=1.0, total_steps=10, power=0), "power must be > 0"),
    ],
)
def test_bad_schedules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        WarmupDecay(**kwargs)
