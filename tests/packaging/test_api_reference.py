"""The API reference pages (docs/_hooks/hooks.py): public names first and documented, internals left out."""

from __future__ import annotations

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


def test_module_page_documents_public_names_only(hooks):
    page = hooks.module_page("ring_core.dilated")
    assert "::: ring_core.dilated.DilatedAttention" in page and "::: ring_core.dilated.dilated_attention" in page
    for internal in ("Branch", "Part", "dilated_parts", "branches"):
        assert f"ring_core.dilated.{internal}\n" not in page, internal
    assert page.index("members: false") < page.index("::: ring_core.dilated.DilatedAttention")


def test_module_without_public_names_says_so(hooks):
    page = hooks.module_page("ring_core.cli")
    assert "No public names" in page and "::: ring_core.cli." not in page


def test_factory_page_lists_every_implementation_arguments(hooks):
    import ring_core

    assert "<!-- generated: implementation-arguments -->" in hooks.module_page("ring_core.factory")
    text = hooks.generated("implementation-arguments")
    for impl in ring_core.list_implementations():
        assert f"### `{impl.name}`" in text
    assert "| `segment_lengths` | `Sequence[int]` | required |" in text
