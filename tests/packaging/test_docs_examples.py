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
