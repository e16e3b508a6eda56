"""Shared fixtures: a fresh random seed per check, reported on failure."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture
def seed(request) -> int:
    """A new seed for every test run (fresh inputs), printed by pytest when the test fails."""
    value = random.SystemRandom().randrange(2**31)
    request.node.user_properties.append(("seed", value))
    torch.manual_seed(value)
    return value


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                print(f"\n[seed used by {item.name}: {value}]")
