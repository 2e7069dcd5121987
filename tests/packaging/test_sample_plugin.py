"""The plugin-author guide's sample package (tests/sample_plugin): in-process, and installed from a wheel.

Its conformance against the reference is its own test: tests/sample_plugin/tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ring_core

SAMPLE_SRC = Path(__file__).resolve().parents[1] / "sample_plugin" / "src"


@pytest.fixture
def example_plugin(fresh_registry, monkeypatch):
    """The sample plugin registered directly, as a test registers any plugin object."""
    monkeypatch.setenv("RING_ATTENTION_DISABLE_PLUGINS", "example")  # in case it is installed here
    monkeypatch.syspath_prepend(str(SAMPLE_SRC))
    from ring_attention_example import plugin

    registry = fresh_registry()
    registry.register_plugin(plugin, name="example")
    try:
        yield registry
    finally:
        registry.unregister_plugin("example")
        for name in [m for m in sys.modules if m.startswith("ring_attention_example")]:
            del sys.modules[name]


def test_registers_a_kernel_and_an_implementation(example_plugin):
    assert "example_einsum" in [k.name for k in ring_core.list_kernels()]
    impl = {i.name: i for i in ring_core.list_implementations()}["example_dilated"]
    assert impl.package == "ring-attention-example" and impl.available
    assert impl.aliases == {"ExampleAttentionV1": "1.0.0"}
    # priority -10: "auto" still prefers ring-core's own implementation and kernels
    assert ring_core.explain_auto("attention", "cpu", 1)[0].name != "example_dilated"
    assert ring_core.list_kernels()[-1].name == "example_einsum"


def test_kernel_refuses_what_it_does_not_support(example_plugin):
    attn = ring_core.create_attention("example_dilated", segment_lengths=[8], dilation_rates=[1])
    q = torch.randn(1, 8, 2, 4, dtype=torch.bfloat16)
    with pytest.raises(ring_core.KernelNotAvailableError, match="example_einsum.*bfloat16"):
        attn(q, q, q)


def test_deprecated_name_warns_and_resolves(example_plugin):
    import ring_attention_example

    with pytest.warns(
        FutureWarning, match=r"ExampleAttentionV1 .* ring-attention-example 1\.0\.0; use ExampleDilatedAttention"
    ):
        assert ring_attention_example.ExampleAttentionV1 is ring_attention_example.ExampleDilatedAttention
    with pytest.warns(FutureWarning, match="ExampleDilatedAttention"):
        attn = ring_core.create_attention("ExampleAttentionV1", segment_lengths=[8], dilation_rates=[1])
    assert type(attn).__name__ == "ExampleDilatedAttention"


@pytest.mark.slow
def test_installed_plugin_is_found_through_its_entry_point(wheel_venv):
    """pip install from the wheelhouse (--no-index) into the fresh venv; the registry finds it."""
    wheel_venv.pip_install("ring-attention-example")
    script = (
        "import ring_core\n"
        "reg = ring_core.get_registry()\n"
        "info = {p.name: p for p in reg.plugins}['example']\n"
        "assert (info.package, info.version) == ('ring-attention-example', '0.1.0'), info\n"
        "assert 'example_einsum' in reg.kernels, list(reg.kernels)\n"
        "impl = reg.implementations['example_dilated']\n"
        "print(impl.cls.__module__, ring_core.create_attention('example_dilated', segment_lengths=[4], dilation_rates=[1]))\n"
    )
    out = wheel_venv.run(str(wheel_venv.python), "-c", script).stdout
    assert "ring_attention_example.attention" in out, out
    verify = wheel_venv.run(str(wheel_venv.bin / "ring-attention"), "verify", "--impl", "example_dilated").stdout
    rows = [line for line in verify.splitlines() if line.startswith("[") and " example_dilated " in line]
    assert rows and all(line.rstrip().endswith("PASS") for line in rows), verify
