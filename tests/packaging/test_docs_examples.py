"""The code the documentation shows runs: the quickstart example and the concept figures."""

from __future__ import annotations

import importlib.util
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_figures():
    """docs/_hooks/figures.py, which the docs build imports (not a package, so loaded by path)."""
    spec = importlib.util.spec_from_file_location("figures", ROOT / "docs" / "_hooks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_model_runs(capsys):
    runpy.run_path(str(ROOT / "docs" / "examples" / "quickstart_model.py"), run_name="__main__")
    assert capsys.readouterr().out.strip() == "torch.Size([2, 3000, 256])"


@pytest.mark.parametrize("name", ["as_function.py", "factory_names.py", "merge_with_memory.py"])
def test_examples_run(name, capsys):
    runpy.run_path(str(ROOT / "docs" / "examples" / name), run_name="__main__")
    if name == "factory_names.py":
        assert capsys.readouterr().out.strip().splitlines()[-1].startswith("-> ")
    if name == "merge_with_memory.py":
        assert capsys.readouterr().out.strip() == "True"


def test_packed_documents_example_equals_separate_calls(capsys):
    runpy.run_path(str(ROOT / "docs" / "examples" / "packed_documents.py"), run_name="__main__")
    assert capsys.readouterr().out.strip() == "max difference: 0.0e+00"


@pytest.mark.distributed
def test_packed_ring_example_sends_the_window_across_the_boundary(capsys):
    """Document [20, 40) crosses the shards' boundary at 32: rank 0 sends the 4 rows the window reaches."""
    runpy.run_path(str(ROOT / "docs" / "examples" / "packed_ring.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(", ")[0] for line in lines] == ["rank 0: sent 4 rows", "rank 1: sent 0 rows"]
    assert all(float(line.rsplit(" ", 1)[1]) < 1e-12 for line in lines)


@pytest.mark.slow
def test_concept_figures_render():
    pytest.importorskip("matplotlib")
    figures = load_figures()
    images = figures.render_all(dpi=30)
    assert set(images) == set(figures.FIGURES)
    assert all(data.startswith(b"\x89PNG") for data in images.values())


def test_zigzag_work_is_balanced_and_lse_figure_is_exact():
    """The numbers the concept figures show: zigzag equalises causal work; the merge matches softmax."""
    pytest.importorskip("matplotlib")
    figures = load_figures()
    zigzag = figures.causal_work(64, 4, "zigzag")
    contiguous = figures.causal_work(64, 4, "contiguous")
    assert zigzag.sum() == contiguous.sum() == 64 * 65 // 2
    assert len(set(zigzag.sum(dim=0).tolist())) == 1
    assert zigzag.max(dim=1).values.sum() < contiguous.max(dim=1).values.sum()
    needed = figures.needed_keys(64, 4, 4, [8, 16], [1, 2])  # every segment inside a shard of 16
    for rank in range(4):
        outside = [s for s in range(64) if s // 16 != rank]
        assert not needed[rank][:, outside].any()


def test_migration_guide_shows_what_the_script_prints(capsys):
    """docs/migration.md's output block is what docs/examples/migration_differences.py prints."""
    runpy.run_path(str(ROOT / "docs" / "examples" / "migration_differences.py"), run_name="__main__")
    printed = capsys.readouterr().out.strip()
    guide = (ROOT / "docs" / "migration.md").read_text()
    shown = guide.split("<!-- migration-output -->\n```text\n")[1].split("```\n<!-- /migration-output -->")[0]
    assert printed == shown.strip()


def test_no_page_calls_a_merge_the_originals():
    """SPEC.md: merge="head_groups" borrows an idea and reproduces no peer's numbers; nothing may say otherwise."""
    paths = [*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("packages/*/README.md")]
    paths += list(ROOT.glob("packages/*/src/**/*.py"))
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            lowered = line.lower()
            if ("merge" in lowered or "head_groups" in lowered or "head-group" in lowered) and "never" not in lowered:
                assert "original's" not in lowered and "variant" not in lowered, f"{path}:{number}: {line}"
