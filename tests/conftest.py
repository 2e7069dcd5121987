"""Shared fixtures: a clean registry per test that changes plugins or environment."""

from __future__ import annotations

import pytest
import torch

import ring_core


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_registry(monkeypatch):
    """Reload the registry for this test (after it sets env vars) and again after it."""
    ring_core.reset_registry()
    yield ring_core.get_registry
    ring_core.reset_registry()
