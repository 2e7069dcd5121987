"""Every registered, available attention implementation on seeded random cases vs the float64 reference of SPEC.md.

The hand-written cases of ``ring_core.testing`` pick shapes; these are drawn (:func:`tools.fuzz.draw_case`: odd
``N``, one to three branches of rates 1-4, GQA, batch, causality, key padding, sliding windows, packed documents,
both merges), so a new implementation meets shapes nobody chose. The seeds are fixed: a run is repeatable;
``python -m tools.fuzz`` draws thousands more.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ring_core
from ring_core.testing import check_attention
from tools.fuzz import draw_case

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_random_case_matches_reference(impl, seed):
    case = draw_case(seed)
    attn = ring_core.create_attention(impl.name, **case.config, **impl.options)
    result = check_attention(attn, case, torch.float64, seed=seed)
    assert result.passed, f"{impl.name} {case.__dict__}: errors {result.errors} > {result.tolerance}"


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_one_module_on_calls_of_changing_shapes(impl, seed):
    """What a training loop of variable-length batches does: one module, calls whose ``N``, batch, heads, causality,
    padding and documents change (each drawn case's shapes under the first one's configuration); every call
    matches the reference, whatever the module cached for the calls before."""
    first = draw_case(seed)
    attn = ring_core.create_attention(impl.name, **first.config, **impl.options)
    for call in range(6):
        shapes = draw_case(1000 * (seed + 1) + call)
        case = dataclasses.replace(
            shapes, segment_lengths=first.segment_lengths, dilation_rates=first.dilation_rates, merge=first.merge,
            window_size=first.window_size,
        )  # fmt: skip
        if first.merge == "head_groups":  # the heads must split into the groups: the first case's heads
            case = dataclasses.replace(case, heads=first.heads, kv_heads=first.kv_heads)
        result = check_attention(attn, case, torch.float64, seed=call)
        assert result.passed, f"{impl.name} call {call} {case.__dict__}: errors {result.errors} > {result.tolerance}"


def test_the_fuzz_tool_reports_a_wrong_result(monkeypatch, capsys):
    """``python -m tools.fuzz`` on one process and on a gloo group: clean draws exit 0; a kernel made wrong (the
    dilated engine's merge dropping the second block) is printed with its seed and exits 1."""
    from tools import fuzz

    assert fuzz.main(["--minutes", "0.02", "--only", "dilated", "ring_dilated"]) == 0
    assert fuzz.main(["--ranks", "2", "--draws", "6", "--only", "ring_dilated"]) == 0
    monkeypatch.setattr(ring_core.MathKernel, "merge", lambda self, out, lse, o, block_lse: None)
    monkeypatch.setattr(ring_core.CPUFlashKernel, "merge", lambda self, out, lse, o, block_lse: None)
    assert fuzz.main(["--minutes", "0.02", "--only", "dilated"]) == 1
    assert "WRONG seed" in capsys.readouterr().out
