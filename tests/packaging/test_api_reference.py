"""The API reference pages (docs/_hooks/hooks.py): public names first and documented, internals left out."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "docs" / "_hooks"

pytest.importorskip("mkdocs")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def hooks(request):
    sys.path.insert(0, str(HOOKS))
    request.addfinalizer(lambda: sys.path.remove(str(HOOKS)))
    spec = importlib.util.spec_from_file_location("docs_hooks", HOOKS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def defined_names(module: str) -> set[str]:
    """Classes and functions a module defines (not imports), underscore names left out."""
    mod = importlib.import_module(module)
    return {
        name
        for name, obj in vars(mod).items()
        if not name.startswith("_") and getattr(obj, "__module__", None) == module and callable(obj)
    }


def test_module_pages_document_their_declared_names_and_nothing_else(hooks):
    for modules in hooks.public_modules().values():
        for module in (m for m in modules if "." in m):
            page = hooks.module_page(module)
            here, _ = hooks.public_names(module)
            documented = {line.split(".")[-1] for line in page.splitlines() if line.startswith(f"::: {module}.")}
            assert documented == set(here), module
            assert not documented & (defined_names(module) - set(here)), module  # internals stay off
            if here:
                assert page.index("members: false") < page.index(f"::: {module}.{here[0]}")
            else:
                assert "No public names" in page or "Also importable from here" in page, module


def test_a_declared_name_is_documented_where_it_is_defined(hooks):
    page = hooks.module_page("ring_core.dilated")
    assert "::: ring_core.dilated.DilatedAttention" in page and "::: ring_core.dilated.dilated_attention" in page


def test_factory_page_lists_every_implementation_arguments(hooks):
    import ring_core

    assert "<!-- generated: implementation-arguments -->" in hooks.module_page("ring_core.factory")
    text = hooks.generated("implementation-arguments")
    for impl in ring_core.list_implementations():
        assert f"### `{impl.name}`" in text
    assert "| `segment_lengths` | `Sequence[int]` | required |" in text
