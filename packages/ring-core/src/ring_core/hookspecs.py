"""Hook specifications of the ``ring_attention`` plugin system.

Every hook receives a ``register`` callback, so one plugin can register several
things in one call and the host controls the record type (the simonw/llm style).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

__all__ = [
    "PROJECT_NAME",
    "hookimpl",
    "hookspec",
    "register_commands",
    "register_implementations",
    "register_kernels",
    "register_patterns",
]

PROJECT_NAME = "ring_attention"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_kernels(register: Callable[..., None]) -> None:
    """Register kernel backends: ``register(backend)`` with a :class:`ring_core.KernelBackend`."""


@hookspec
def register_implementations(register: Callable[..., None]) -> None:
    """Register attention implementations: ``register(Implementation(...))``."""


@hookspec
def register_patterns(register: Callable[..., None]) -> None:
    """Register named block-sparse patterns: ``register(name, builder)``."""


@hookspec
def register_commands(register: Callable[..., None]) -> None:
    """Register ``ring-attention`` subcommands: ``register(name, add_parser)``.

    ``add_parser(subparsers)`` adds the subcommand to the ``argparse`` subparsers object and sets
    its ``func`` default: a callable of the parsed arguments that returns the exit code.
    """
