"""A plugin that fails half-way keeps nothing; a plugin never replaces a name another package owns.

tests/misbehaving_plugin is an installable package of four misbehaving plugins: in-process
(registered as objects), and installed from a wheel (found through its entry points).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ring_core

SRC = Path(__file__).resolve().parents[1] / "misbehaving_plugin" / "src"
PLUGINS = {
    "half_broken": "HALF_BROKEN",
    "impostor_kernel": "IMPOSTOR_KERNEL",
    "impostor_implementation": "IMPOSTOR_IMPLEMENTATION",
    "impostor_pattern": "IMPOSTOR_PATTERN",
}


@pytest.fixture
def misbehaving(fresh_registry, monkeypatch):
    """Every misbehaving plugin registered as an object, as a test registers any plugin."""
    monkeypatch.setenv("RING_ATTENTION_DISABLE_PLUGINS", ",".join(PLUGINS))  # in case it is installed here
    monkeypatch.syspath_prepend(str(SRC))
    from ring_attention_misbehaving import plugins

    registry = fresh_registry()
    for name, attribute in PLUGINS.items():
        registry.register_plugin(getattr(plugins, attribute), name=name)
    try:
        yield registry
    finally:
        for name in [m for m in sys.modules if m.startswith("ring_attention_misbehaving")]:
            del sys.modules[name]


def _dense_is_exact() -> float:
    q, k, v = (torch.randn(1, 12, 2, 4, dtype=torch.float64) for _ in range(3))
    out = ring_core.DilatedAttention([16], [1])(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return float((out - expected.transpose(1, 2)).abs().max())


def test_a_plugin_that_fails_half_way_keeps_nothing(misbehaving):
    errors = {e.name: e.error for e in ring_core.plugin_errors()}
    assert "this plugin fails half-way" in errors["half_broken"] and "nothing of it was kept" in errors["half_broken"]
    assert "misbehaving_half" not in misbehaving.kernels
    assert ring_core.list_kernels()[0].name != "misbehaving_half"
    assert _dense_is_exact() < 1e-12


def test_a_plugin_never_replaces_a_name_another_package_owns(misbehaving):
    errors = {e.name: e.error for e in ring_core.plugin_errors()}
    assert (
        "kernel 'cpu_flash' is already registered by ring-core (plugin 'core'); plugin 'impostor_kernel'"
        in (errors["impostor_kernel"])
    )
    assert (
        "implementation name (canonical, class or alias) 'ring_dilated' is already registered by ring-core "
        "(plugin 'core'); ring-attention-misbehaving (plugin 'impostor_implementation') may not register it"
    ) in errors["impostor_implementation"]
    assert (
        "pattern 'random' is already registered by ring-blocksparse (plugin 'blocksparse')"
        in (errors["impostor_pattern"])
    )
    assert type(misbehaving.kernels["cpu_flash"]) is ring_core.CPUFlashKernel
    assert misbehaving.implementations["ring_dilated"].cls is ring_core.RingDilatedAttention
    assert misbehaving.patterns["random"].__module__.startswith("ring_blocksparse")
    assert _dense_is_exact() < 1e-12


@pytest.mark.slow
def test_installed_misbehaving_plugins_are_refused_and_reported(wheel_venv):
    """pip install from the wheelhouse into the fresh venv: the entry points load, nothing of them is kept."""
    wheel_venv.pip_install("ring-attention-misbehaving")
    try:
        script = (
            "import torch, ring_core\n"
            "reg = ring_core.get_registry()\n"
            "errors = {e.name: (e.package, e.error) for e in ring_core.plugin_errors()}\n"
            f"assert sorted(errors) == {sorted(PLUGINS)}, errors\n"
            "assert 'misbehaving_half' not in reg.kernels and type(reg.kernels['cpu_flash']) is ring_core.CPUFlashKernel\n"
            "assert reg.implementations['ring_dilated'].cls is ring_core.RingDilatedAttention\n"
            "q, k, v = (torch.randn(1, 12, 2, 4, dtype=torch.float64) for _ in range(3))\n"
            "out = ring_core.DilatedAttention([16], [1])(q, k, v)\n"
            "ref = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)))\n"
            "assert (out - ref.transpose(1, 2)).abs().max() < 1e-12\n"
            "from ring_core.cli import main\n"
            "main(['info'])\n"
        )
        info = wheel_venv.run(str(wheel_venv.python), "-c", script).stdout
        assert "ring-core (plugin 'core'); ring-attention-misbehaving (plugin 'impostor_kernel')" in info, info
        for name in PLUGINS:
            assert any(line.startswith(name) and "FAILED" in line for line in info.splitlines()), info
    finally:
        wheel_venv.run(
            sys.executable, "-m", "pip", "--python", str(wheel_venv.python), "uninstall", "-y",
            "ring-attention-misbehaving",
        )  # fmt: skip
