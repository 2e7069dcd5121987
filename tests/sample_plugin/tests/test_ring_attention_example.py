"""The sample plugin's own tests: register the plugin object, then ring-core's conformance checks."""

import pytest
import torch
from ring_attention_example import plugin

import ring_core
from ring_core.testing import CASES, check_attention


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv("RING_ATTENTION_DISABLE_PLUGINS", "example")  # if it is also installed
    ring_core.reset_registry()
    registry = ring_core.get_registry()
    registry.register_plugin(plugin, name="example")
    yield registry
    ring_core.reset_registry()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(registry, case, dtype):
    attn = ring_core.create_attention("example_dilated", **case.config)
    result = check_attention(attn, case, dtype)
    assert result.passed, f"{case} {dtype}: {result.errors} > {result.tolerance}"
