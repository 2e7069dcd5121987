"""The plugin registry: loads ``ring_attention`` entry points once, lazily.

Environment:

- ``RING_ATTENTION_DISABLE_PLUGINS=a,b`` blocks the named plugins (entry-point names).
- ``RING_ATTENTION_LOAD_PLUGINS=a,b`` loads only those (empty: none but core).
- ``RING_ATTENTION_KERNEL=name`` forces a kernel backend.

A plugin that fails to import or to register is recorded in :func:`plugin_errors`
and skipped; the host keeps working.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from .kernels import KernelBackend

__all__ = [
    "CORE_PLUGIN",
    "Implementation",
    "PluginInfo",
    "Registry",
    "get_registry",
    "list_implementations",
    "list_kernels",
    "plugin_errors",
    "reset_registry",
]

CORE_PLUGIN = "core"


@dataclass
class Implementation:
    """An attention implementation as registered by a plugin."""

    name: str
    cls: type
    package: str
    description: str
    aliases: dict[str, str] = field(default_factory=dict)  # deprecated name -> removal version
    kind: str = "attention"  # "attention" (q, k, v) or "multihead" (nn.MultiheadAttention-like)
    distributed: bool = False  # shards the sequence over a process group
    devices: tuple[str, ...] = ("cpu", "cuda")
    priority: int = 0  # for "auto": higher wins among the available
    check: Callable[[], list[str]] | None = None
    options: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments for tests/verify
    bench_options: dict[str, Any] | None = None  # for `ring-attention bench` (long sequences); default: options

    @property
    def reasons(self) -> list[str]:
        """Why it cannot be used here (empty when available)."""
        if self.check is None:
            return []
        try:
            return list(self.check())
        except Exception as exc:  # a broken check must not break the host
            return [f"availability check failed: {exc!r}"]

    @property
    def available(self) -> bool:
        return not self.reasons


@dataclass
class PluginInfo:
    name: str
    package: str | None
    version: str | None
    error: str | None = None


class PluginRejected(Exception):
    """A plugin's registration failed (a hook raised, or it registered a name already taken); nothing is kept."""


class Registry:
    """Everything the loaded plugins registered; build one with :func:`get_registry`.

    A plugin registers all or nothing: what its hooks register is kept only when every hook
    succeeds and none of its names (kernel, implementation name, class name or alias, pattern, command)
    is already taken. A plugin never replaces another's name, a built-in included; the
    refused one is reported in :attr:`errors` with both packages named.
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.implementations: dict[str, Implementation] = {}
        self.kernels: dict[str, KernelBackend] = {}
        self.patterns: dict[str, Callable[..., Any]] = {}
        self.commands: dict[str, Callable[..., Any]] = {}  # subcommand -> add_parser(subparsers)
        self.errors: list[PluginInfo] = []
        self.disabled: list[PluginInfo] = []  # installed but filtered out: ``error`` says by which variable
        self.owners: dict[tuple[str, str], str] = {}  # (kind, name) -> who registered it

    # -- loading -------------------------------------------------------------
    def load_entry_points(self) -> None:
        disabled = _env_list("RING_ATTENTION_DISABLE_PLUGINS") or set()
        allowed = _env_list("RING_ATTENTION_LOAD_PLUGINS")
        # core first (its kernels and implementations are the baseline), and never filtered out
        entry_points = metadata.entry_points(group=hookspecs.PROJECT_NAME)
        for ep in sorted(entry_points, key=lambda e: (e.name != CORE_PLUGIN, e.name)):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, dist.name if dist else None, dist.version if dist else None)
            if ep.name != CORE_PLUGIN and ep.name in disabled:
                info.error = (
                    f"disabled by RING_ATTENTION_DISABLE_PLUGINS={os.environ['RING_ATTENTION_DISABLE_PLUGINS']}"
                )
                self.disabled.append(info)
                continue
            if ep.name != CORE_PLUGIN and allowed is not None and ep.name not in allowed:
                info.error = f"not in RING_ATTENTION_LOAD_PLUGINS={os.environ['RING_ATTENTION_LOAD_PLUGINS']}"
                self.disabled.append(info)
                continue
            if self.pm.has_plugin(ep.name):
                continue
            try:
                self.pm.register(ep.load(), name=ep.name)
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                self.errors.append(info)
                continue
            self.plugins.append(info)
        if not self.pm.has_plugin(CORE_PLUGIN):
            self.errors.append(
                PluginInfo(
                    CORE_PLUGIN, "ring-core", None, "entry point ring_attention:core not found (install ring-core)"
                )
            )

    def register_plugin(self, plugin: object, name: str) -> None:
        """Register a plugin object directly (tests, notebooks) and collect what it registers."""
        self.pm.register(plugin, name=name)
        self.plugins.append(PluginInfo(name, None, None))
        self._collect(only=plugin, name=name)

    def unregister_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins = [p for p in self.plugins if p.name != name]
        self.implementations.clear()
        self.kernels.clear()
        self.patterns.clear()
        self.commands.clear()
        self.owners.clear()
        self.collect_all()

    def _collect(self, only: object, name: str) -> None:
        """Collect what one plugin registers: all of it, or, when a hook raises or a name is taken, none of it."""
        info = next((p for p in self.plugins if p.name == name), PluginInfo(name, None, None))
        owner = f"{info.package} (plugin {name!r})" if info.package else f"plugin {name!r}"
        staged: list[tuple[str, str, object, str]] = []  # (kind, name, record, owner)

        def kernel(backend: KernelBackend) -> None:
            if not isinstance(backend, KernelBackend):
                raise TypeError(f"register_kernels expects KernelBackend instances, got {backend!r}")
            staged.append(("kernel", backend.name, backend, owner))

        def implementation(impl: Implementation) -> None:
            if not isinstance(impl, Implementation):
                raise TypeError(f"register_implementations expects Implementation records, got {impl!r}")
            by = f"{impl.package} (plugin {name!r})"
            for alias in dict.fromkeys((impl.name, impl.cls.__name__, *impl.aliases)):
                staged.append(("implementation", alias, impl if alias == impl.name else None, by))

        def pattern(pattern_name: str, builder: Callable[..., Any]) -> None:
            staged.append(("pattern", pattern_name, builder, owner))

        def command(command_name: str, add_parser: Callable[..., Any]) -> None:
            if not callable(add_parser):
                raise TypeError(
                    f"register_commands expects register(name, add_parser), got {add_parser!r} for {command_name!r}"
                )
            staged.append(("command", command_name, add_parser, owner))

        try:
            for hook_name, add in (
                ("register_kernels", kernel),
                ("register_implementations", implementation),
                ("register_patterns", pattern),
                ("register_commands", command),
            ):
                caller = self.pm.subset_hook_caller(
                    hook_name, remove_plugins=[p for p in self.pm.get_plugins() if p is not only]
                )
                try:
                    caller(register=add)
                except Exception as exc:
                    raise PluginRejected(f"{hook_name}: {type(exc).__name__}: {exc}") from exc
            self._check_names(staged)
        except PluginRejected as rejected:
            self.errors.append(PluginInfo(name, info.package, info.version, f"{rejected} (nothing of it was kept)"))
            self.plugins = [p for p in self.plugins if p.name != name]
            self.pm.unregister(name=name)
            return
        # each kind's callback above staged records of its table's value type
        tables: dict[str, dict[str, Any]] = {
            "kernel": self.kernels,
            "implementation": self.implementations,
            "pattern": self.patterns,
            "command": self.commands,
        }
        for kind, key, record, by in staged:
            self.owners[kind, key] = by
            if record is not None:
                tables[kind][key] = record

    def _check_names(self, staged: list[tuple[str, str, object, str]]) -> None:
        """Refuse a name that is already taken (by another plugin, or twice by this one), naming both owners."""
        seen: dict[tuple[str, str], str] = {}
        for kind, key, _, by in staged:
            taken = self.owners.get((kind, key)) or seen.get((kind, key))
            if taken is not None:
                what = "implementation name (canonical, class or alias)" if kind == "implementation" else kind
                raise PluginRejected(
                    f"{what} {key!r} is already registered by {taken}; {by} may not register it again "
                    f"(a plugin never replaces another's name: choose another name)"
                )
            seen[kind, key] = by

    def collect_all(self) -> None:
        for name, plugin in list(self.pm.list_name_plugin()):
            self._collect(only=plugin, name=name)

    # -- queries ---------------------------------------------------------------
    def sorted_kernels(self) -> list[KernelBackend]:
        return sorted(self.kernels.values(), key=lambda k: (-k.priority, k.name))


def _env_list(variable: str) -> set[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


_lock = threading.Lock()
_registry: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    with _lock:
        if _registry is None:
            registry = Registry()
            registry.load_entry_points()
            registry.collect_all()
            _registry = registry
        return _registry


def reset_registry() -> None:
    """Forget the loaded registry; the next use reloads (tests, after changing the env)."""
    global _registry
    with _lock:
        _registry = None


def list_implementations(kind: str | None = None) -> list[Implementation]:
    """Every registered implementation (available or not), optionally of one ``kind``."""
    items = get_registry().implementations.values()
    return sorted((i for i in items if kind is None or i.kind == kind), key=lambda i: i.name)


def list_kernels() -> list[KernelBackend]:
    """Every registered kernel backend in dispatch order (highest priority first)."""
    return get_registry().sorted_kernels()


def plugin_errors() -> list[PluginInfo]:
    """Plugins that failed to load or register, with their errors."""
    return list(get_registry().errors)
