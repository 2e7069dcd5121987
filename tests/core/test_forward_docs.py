"""Every public class with a ``forward`` documents it in the project (not nn.Module's placeholder).

Attention modules (what the factories build) document shapes, dtypes, masks and the return value.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from torch import nn

PACKAGES = ["ring_core", "ring_flash", "ring_distributed", "ring_multihead", "ring_blocksparse"]


def public_classes_with_forward() -> list[type]:
    found: dict[type, None] = {}
    for name in PACKAGES:
        package = pytest.importorskip(name)
        modules = [package] + [
            importlib.import_module(f"{name}.{m.name}")
            for m in pkgutil.iter_modules(package.__path__)
            if not m.name.startswith("_")
        ]
        for module in modules:
            for public in getattr(module, "__all__", []):
                obj = getattr(module, public, None)
                if inspect.isclass(obj) and callable(getattr(obj, "forward", None)):
                    found.setdefault(obj)
    return list(found)


CLASSES = public_classes_with_forward()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_forward_has_a_project_docstring(cls):
    owner = next(k for k in cls.__mro__ if "forward" in vars(k))
    doc = owner.forward.__doc__
    assert owner.__module__.startswith(tuple(PACKAGES)), f"{cls.__name__}.forward is {owner.__module__}'s"
    assert doc and doc != nn.Module.forward.__doc__, f"{owner.__qualname__}.forward has no docstring"
    if issubclass(cls, nn.Module):  # a module's forward: every argument (masks included), shapes, dtypes, return
        text = inspect.getdoc(owner.forward)
        arguments = list(inspect.signature(owner.forward).parameters)[1:]
        for needle in ("Args:", "Returns:", "(B", *(f"{name}:" for name in arguments)):
            assert needle in text, f"{owner.__qualname__}.forward's docstring lacks {needle!r}"
        assert "float" in text or "dtype" in text, f"{owner.__qualname__}.forward: say which dtypes"


def test_the_factories_modules_are_covered():
    import ring_core

    covered = set(CLASSES)
    for impl in ring_core.list_implementations():
        assert impl.cls in covered or any(issubclass(impl.cls, c) for c in covered), impl.name
