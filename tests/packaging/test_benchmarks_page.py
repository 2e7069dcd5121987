"""The benchmarks page and the README's headline, generated from docs/benchmarks/*.json (docs/_hooks)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HOOKS = ROOT / "docs" / "_hooks"

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def hooks(request):
    sys.path.insert(0, str(HOOKS))
    request.addfinalizer(lambda: sys.path.remove(str(HOOKS)))
    import benchpage
    import headline

    return benchpage, headline


def tables(markdown: str) -> list[list[list[str]]]:
    """The markdown tables of a block outside its folded (``??? note``) parts, as rows of cells."""
    visible = markdown.split("Older runs and variants, folded:")[0]
    found, current = [], []
    for line in [*visible.splitlines(), ""]:
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif current:
            found.append(current)
            current = []
    return found


def test_every_question_of_the_page_has_an_answer(hooks):
    benchpage, _ = hooks
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert re.findall(r"<!-- answer: ([a-z-]+) -->", page) == list(benchpage.ANSWERS)
    assert "Placeholder" not in page


@pytest.mark.parametrize("name", ["one-gpu", "tokens", "ring", "blocksparse", "cpu"])
def test_answer_has_a_conclusion_named_kernels_and_units(hooks, name):
    benchpage, _ = hooks
    markdown = benchpage.answer_markdown(name)
    assert markdown.startswith("**Answer.** ") and re.search(r"\d", markdown.splitlines()[0])
    found = tables(markdown)
    assert found
    for rows in found:
        header, body = rows[0], rows[2:]
        assert not any("_" in cell and "`" not in cell for cell in header), header  # human names, not JSON keys
        if "kernel" in header:
            column = header.index("kernel")
            named = [row[column].startswith("`") or row[column] == "not recorded by this run" for row in body]
            assert all(named), (header, body)
        assert body and all(len(row) == len(header) for row in body)
    assert any("kernel" in rows[0] for rows in found)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["one-gpu", "tokens", "ring", "blocksparse", "cpu"])
def test_answer_figure_has_no_empty_panel(hooks, name):
    benchpage, _ = hooks
    figure = benchpage.ANSWERS[name]().figure()
    for ax in figure.axes:
        assert ax.lines or ax.patches or ax.collections, f"{name}: an empty panel titled {ax.get_title()!r}"


def test_readme_headline_table_matches_the_json(hooks):
    _, headline = hooks
    readme = (ROOT / "README.md").read_text()
    block = headline.BLOCK.search(readme)
    assert block, "README.md lost its headline block"
    assert block[0] == block[1] + headline.ratios_markdown() + block[2], "run: python docs/_hooks/headline.py"
    rows = headline.ratios()
    assert len(rows) == 6
    for _what, _result, _card, name in rows:
        assert (ROOT / "docs" / "benchmarks" / name).is_file()
    assert "](docs/images/headline.png)" in readme


@pytest.mark.slow
def test_headline_figure_is_committed_and_redrawn_by_write(hooks, tmp_path):
    """``write`` draws both panels into a copy of the repository's files and fills the README's table."""
    _, headline = hooks
    committed = ROOT / "docs" / "images" / "headline.png"
    assert committed.read_bytes().startswith(b"\x89PNG")
    (tmp_path / "README.md").write_text(headline.BLOCK.sub(lambda m: m[1] + m[2], (ROOT / "README.md").read_text()))
    changed = headline.write(tmp_path)
    assert {p.name for p in changed} == {"headline.png", "README.md"}
    assert (tmp_path / "README.md").read_text() == (ROOT / "README.md").read_text()
    assert len(headline.figure().axes) == 2
