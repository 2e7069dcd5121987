"""Deprecated names: one table per package, served by a module ``__getattr__`` and the factory.

A table maps ``old_name -> (new_name, removal_version)``. Access warns with a
``FutureWarning`` (shown to users by default) naming the replacement and the
version that removes the old name.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "DeprecationTable",
    "aliases_for",
    "deprecated_getattr",
    "deprecation_message",
    "version_tuple",
    "warn_deprecated",
]

DeprecationTable = Mapping[str, tuple[str, str]]


def deprecation_message(old: str, new: str, removal: str, package: str) -> str:
    return f"{old} is deprecated and will be removed in {package} {removal}; use {new} instead."


def warn_deprecated(old: str, new: str, removal: str, package: str, stacklevel: int = 3) -> None:
    warnings.warn(deprecation_message(old, new, removal, package), FutureWarning, stacklevel=stacklevel)


def deprecated_getattr(module_name: str, package: str, table: DeprecationTable) -> Callable[[str], Any]:
    """A module ``__getattr__`` that resolves the old names of ``table`` with a warning."""

    def __getattr__(name: str) -> Any:
        if name in table:
            new, removal = table[name]
            warn_deprecated(name, new, removal, package)
            return getattr(importlib.import_module(module_name), new)
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__


def aliases_for(table: DeprecationTable, new: str) -> dict[str, str]:
    """The deprecated names that point at ``new``, with their removal versions (for registration)."""
    return {old: removal for old, (target, removal) in table.items() if target == new}


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.3.0rc1" -> (0, 3, 0)``: the numeric release part, for comparisons."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise ValueError(f"not a release version: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))
