"""Plugin registry, factory names and kernel dispatch."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import ring_core
from ring_core import Implementation, KernelBackend, KernelRequest, hookimpl
from ring_core.deprecation import version_tuple


class EchoAttention(torch.nn.Module):
    def __init__(self, **config):
        super().__init__()
        self.config = config


class SamplePlugin:
    @hookimpl
    def register_implementations(self, register):
        register(
            Implementation(
                name="sample_echo",
                cls=EchoAttention,
                package="sample",
                description="test double",
                aliases={"SampleEchoV2": "9.0.0"},
            )
        )

    @hookimpl
    def register_kernels(self, register):
        register(NeverKernel())

    @hookimpl
    def register_patterns(self, register):
        register("sample_pattern", lambda num_blocks: None)


class NeverKernel(KernelBackend):
    name = "never"
    priority = 100

    def availability_reasons(self):
        return ["the library 'never' is not installed"]


class BrokenPlugin:
    @hookimpl
    def register_implementations(self, register):
        raise RuntimeError("boom")


@pytest.fixture
def registry(fresh_registry):
    return fresh_registry()


def test_core_registers_through_its_own_hooks(registry):
    assert "core" in [p.name for p in registry.plugins]
    assert registry.implementations["dilated"].cls is ring_core.DilatedAttention
    assert [k.name for k in ring_core.list_kernels()][-1] == "math"


def test_plugin_object_registers_and_unregisters(registry):
    registry.register_plugin(SamplePlugin(), name="sample")
    try:
        assert isinstance(ring_core.create_attention("sample_echo", a=1), EchoAttention)
        assert "sample_pattern" in registry.patterns and "never" in registry.kernels
        assert isinstance(ring_core.create_attention("EchoAttention"), EchoAttention)
        with pytest.warns(FutureWarning, match=r"SampleEchoV2 is deprecated .* 9\.0\.0; use EchoAttention"):
            ring_core.create_attention("SampleEchoV2")
    finally:
        registry.unregister_plugin("sample")
    assert "sample_echo" not in registry.implementations
    assert "never" not in registry.kernels


def test_broken_plugin_is_reported_and_skipped(registry):
    registry.register_plugin(BrokenPlugin(), name="broken")
    assert any(e.name == "broken" and "boom" in e.error for e in ring_core.plugin_errors())
    assert "dilated" in registry.implementations  # the host keeps working
    assert not registry.pm.has_plugin("broken")


def test_broken_entry_point_is_reported(monkeypatch, fresh_registry):
    from importlib import metadata

    class FakeEntryPoint:
        name, dist = "exploding", None

        def load(self):
            raise ImportError("no module named exploding")

    real = metadata.entry_points
    monkeypatch.setattr(
        metadata,
        "entry_points",
        lambda **kw: [*real(**kw), FakeEntryPoint()] if kw.get("group") == "ring_attention" else real(**kw),
    )
    fresh_registry()
    errors = {e.name: e.error for e in ring_core.plugin_errors()}
    assert "exploding" in errors and "no module named exploding" in errors["exploding"]


def test_disable_and_allow_lists(monkeypatch, fresh_registry):
    monkeypatch.setenv("RING_ATTENTION_DISABLE_PLUGINS", "flash, multihead")
    names = [p.name for p in fresh_registry().plugins]
    assert "flash" not in names and "multihead" not in names and "core" in names
    ring_core.reset_registry()
    monkeypatch.delenv("RING_ATTENTION_DISABLE_PLUGINS")
    monkeypatch.setenv("RING_ATTENTION_LOAD_PLUGINS", "")
    assert [p.name for p in fresh_registry().plugins] == ["core"]
    ring_core.reset_registry()
    monkeypatch.setenv("RING_ATTENTION_LOAD_PLUGINS", "blocksparse")
    assert sorted(p.name for p in fresh_registry().plugins) == ["blocksparse", "core"]


def test_unknown_name_lists_known_and_closest(registry):
    with pytest.raises(KeyError, match=r"Did you mean 'dilated'\?.*Known: .*DilatedAttention"):
        ring_core.create_attention("dilatd")


def test_a_disabled_plugin_is_said_to_be_disabled_not_missing(monkeypatch, fresh_registry, capsys):
    from ring_core.cli import main

    monkeypatch.setenv("RING_ATTENTION_DISABLE_PLUGINS", "flash")
    fresh_registry()
    with pytest.raises(KeyError, match=r"ring-flash \(plugin 'flash'\), which is installed but disabled by "
                       r"RING_ATTENTION_DISABLE_PLUGINS=flash"):  # fmt: skip
        ring_core.create_attention("ring_dilated_flash")
    assert main(["info"]) == 0
    assert re.search(
        r"flash +ring-flash +\S+ +disabled by RING_ATTENTION_DISABLE_PLUGINS=flash", capsys.readouterr().out
    )
    ring_core.reset_registry()
    monkeypatch.delenv("RING_ATTENTION_DISABLE_PLUGINS")
    monkeypatch.setenv("RING_ATTENTION_LOAD_PLUGINS", "multihead")
    fresh_registry()
    with pytest.raises(KeyError, match=r"installed but not in RING_ATTENTION_LOAD_PLUGINS=multihead"):
        ring_core.create_attention("block_sparse_ring_dilated")


def test_name_of_missing_package_says_what_to_install(monkeypatch, fresh_registry):
    from importlib import metadata

    real = metadata.entry_points  # ring-flash not installed: its entry point is not there at all
    monkeypatch.setattr(
        metadata, "entry_points", lambda **kw: [ep for ep in real(**kw) if ep.name != "flash" or "group" not in kw]
    )
    fresh_registry()
    with pytest.raises(
        KeyError,
        match=r'ring-flash, which is not installed\. From a checkout: pip install \./packages/ring-flash;.*"ring-core\[flash\]"',
    ):
        ring_core.create_attention("ring_dilated_flash")


def test_auto_picks_an_available_implementation_and_explains(registry):
    impl, lines = ring_core.explain_auto("attention", device="cpu", world_size=1)
    assert impl.available and "cpu" in impl.devices
    assert lines[-1] == f"-> {impl.name}"
    module = ring_core.create_attention("auto", segment_lengths=[8], dilation_rates=[1])
    assert isinstance(module, torch.nn.Module)


def test_unavailable_implementation_refuses_with_reasons(registry):
    registry.register_plugin(UnavailablePlugin(), name="unavailable")
    try:
        with pytest.raises(RuntimeError, match="needs a quantum computer"):
            ring_core.create_attention("unavailable_impl")
    finally:
        registry.unregister_plugin("unavailable")


class UnavailablePlugin:
    @hookimpl
    def register_implementations(self, register):
        register(
            Implementation(
                name="unavailable_impl",
                cls=EchoAttention,
                package="x",
                description="-",
                check=lambda: ["needs a quantum computer"],
            )
        )


def test_dispatch_lists_every_backend_when_none_fits(registry):
    request = KernelRequest("cpu", torch.int32, 8, 2, 2)
    with pytest.raises(
        ring_core.KernelNotAvailableError, match=r"(?s)dtype=int32.*cpu_flash: dtype int32.*math: dtype int32"
    ):
        ring_core.select_kernel(request)


def test_forced_kernel(monkeypatch, registry):
    request = KernelRequest("cpu", torch.float32, 8, 2, 2)
    assert ring_core.select_kernel(request).name == "cpu_flash"
    assert ring_core.select_kernel(request, "math").name == "math"
    monkeypatch.setenv("RING_ATTENTION_KERNEL", "math")
    assert ring_core.select_kernel(request).name == "math"
    with pytest.raises(ring_core.KernelNotAvailableError, match="known kernels"):
        ring_core.select_kernel(request, "nope")
    with pytest.raises(ring_core.KernelNotAvailableError, match="kernel '' is not registered"):
        ring_core.select_kernel(request, "")  # (not "automatic": that is None)
    monkeypatch.setenv("RING_ATTENTION_KERNEL", "")  # an empty variable is unset
    assert ring_core.select_kernel(request).name == "cpu_flash"
    with pytest.raises(ring_core.KernelNotAvailableError, match="cpu_flash.*dropout is not supported"):
        ring_core.select_kernel(KernelRequest("cpu", torch.float32, 8, 2, 2, dropout_p=0.1), "cpu_flash")


def test_every_deprecated_alias_is_removed_on_schedule(registry):
    """Fails once a package's version reaches the removal version of one of its aliases."""
    for impl in ring_core.list_implementations():
        dist = impl.package
        version = ring_core.__version__ if dist == "ring-core" else _version(dist)
        for alias, removal in impl.aliases.items():
            assert version_tuple(version) < version_tuple(removal), (
                f"{alias} of {dist} was due for removal in {removal}; the package is at {version}"
            )


def _version(dist):
    from importlib import metadata

    return metadata.version(dist)


def test_module_getattr_deprecation():
    from ring_core.deprecation import deprecated_getattr

    getter = deprecated_getattr("ring_core", "ring-core", {"OldDilated": ("DilatedAttention", "1.0.0")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert getter("OldDilated") is ring_core.DilatedAttention
    assert caught[0].category is FutureWarning and "ring-core 1.0.0" in str(caught[0].message)
    with pytest.raises(AttributeError):
        getter("Nope")
    assert version_tuple("0.3.0rc1") == (0, 3, 0)


def test_every_hook_is_documented_and_exercised():
    """Each hookspec has a docstring and a test that registers through it (datasette's meta-test)."""
    import pathlib

    from ring_core import hookspecs

    tests_dir = pathlib.Path(__file__).parents[1]
    sources = "\n".join(p.read_text() for p in tests_dir.rglob("test_*.py"))
    guide = (tests_dir.parent / "docs" / "plugins.md").read_text()
    hooks = [n for n in hookspecs.__all__ if n.startswith("register_")]
    assert {"register_kernels", "register_implementations", "register_patterns", "register_commands"} <= set(hooks)
    for name in hooks:
        assert getattr(hookspecs, name).__doc__, name
        assert f"def {name}(" in sources, f"no test registers through {name}"
        assert f"`{name}(register)`" in guide, f"docs/plugins.md does not document {name}"


class CommandPlugin:
    @hookimpl
    def register_commands(self, register):
        def add_parser(subparsers):
            parser = subparsers.add_parser("echo-test", help="a test double")
            parser.add_argument("word")
            parser.set_defaults(func=lambda args: print(f"echo {args.word}") or 7)

        register("echo-test", add_parser)


def test_plugins_add_cli_subcommands(fresh_registry, capsys):
    """`ring-attention` subcommands come from the register_commands hook; core names none of them."""
    from ring_core.cli import main

    registry = fresh_registry()
    registry.register_plugin(CommandPlugin(), name="commands")
    assert main(["echo-test", "hello"]) == 7
    assert capsys.readouterr().out == "echo hello\n"
    assert registry.commands["pattern"].__module__ == "ring_blocksparse.cli"  # ring-blocksparse's, by its plugin


def test_cli_has_no_pattern_command_without_blocksparse(fresh_registry, monkeypatch, capsys):
    monkeypatch.setenv("RING_ATTENTION_DISABLE_PLUGINS", "blocksparse")
    from ring_core.cli import main

    with pytest.raises(SystemExit):
        main(["pattern", "local_window", "--seq-len", "8"])
    assert "invalid choice: 'pattern'" in capsys.readouterr().err
