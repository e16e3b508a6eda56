"""Shared fixtures: a fresh random seed per check (reported on failure), and Triton's CPU interpreter.

Shared helpers that are not fixtures live in tests/support."""

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


@pytest.fixture
def interpreter(monkeypatch):
    """Triton kernels run by Triton's CPU interpreter in this test, on CPU tensors; skips without triton.

    The kernels are jitted on first use, when the variable is read, so setting it per test works."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                print(f"\n[seed used by {item.name}: {value}]")
