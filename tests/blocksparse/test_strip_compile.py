"""The strips under ``torch.compile(fullgraph=True)`` vs the float64 reference, forward and backward.

Compiled, a strip call is one custom op of ring_core's (``ring_attention::attention`` and its backward): the
forward keeps no FlexAttention graph and the backward recomputes each such call inside the op, below
autograd (:func:`ring_blocksparse.flex.recording`). ``aot_eager`` runs the ops, their fake implementations and
autograd as Inductor would; the CPU computes the fused kernel's dense twin (``sparse_kernel = "math"``: the
same calls, tiles and rule, differentiated by autograd like FlexAttention); the fused kernels compiled run in
tests/core/test_compile_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from tests.blocksparse.test_strip_windows import _module

from ring_core.testing import Case, check_attention, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CASES = [
    (Case("dilated-gqa-causal", 64, 4, (16, 32, 64), (1, 2, 4), kv_heads=2, head_dim=5, causal=True), "random-per-head"),
    (Case("window-padded", 72, 3, (24, 72), (1, 2), head_dim=5, padding=True, window_size=(9, 0), causal=True), "band"),
    (
        Case("packed-head-groups", 64, 4, (8, 32, 64), (1, 2, 4), merge="head_groups", batch=1, head_dim=3,
             documents=(0, 7, 30, 64)),
        "random-per-head",
    ),
    # lengths of partial tiles: inside the op the strips run at the next length of whole tiles
    (Case("odd-dilated-gqa-padded", 61, 4, (16, 32, 64), (1, 2, 4), kv_heads=2, head_dim=5, causal=True, padding=True),
     "random-per-head"),
    (Case("odd-packed", 59, 4, (8, 32, 64), (1, 2, 4), batch=1, head_dim=3, documents=(0, 7, 30, 59)), "band"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name"), CASES, ids=[case.name for case, _ in CASES])
def test_compiled_strips_match_reference(case, name):
    attn = _module(case, name)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    layout = attn.layout_for(case.seq_len, case.heads)
    result = check_attention(compiled, case, torch.float64, reference_options={"block_layout": layout, "block_size": 8})
    assert attn.last_method == "flex"  # (the strips ran, inside the op)
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def test_compiled_strips_return_lse_with_its_gradient():
    case, name = CASES[0]
    attn = _module(case, name)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    q, k, v, _ = make_inputs(case, torch.float64, "cpu", 3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = compiled(*leaves, is_causal=True, return_lse=True)
    eager = [x.clone().requires_grad_() for x in (q, k, v)]
    expected_out, expected_lse = attn(*eager, is_causal=True, return_lse=True)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 1, lse.numel(), dtype=lse.dtype).view(lse.shape)
    grads = torch.autograd.grad((out.sum() + (lse * weights).sum()), leaves)
    expected = torch.autograd.grad((expected_out.sum() + (expected_lse * weights).sum()), eager)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_compiled_auto_falls_back_to_gather_when_the_strips_fail(monkeypatch):
    """Compiled, 'auto' warns and computes the call on the gather path inside the op, forward and backward."""
    import ring_blocksparse.attention as attention

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(attention, "strip_forward", broken)
    monkeypatch.setattr(attention.BlockSparseRingDilatedAttention, "_use_flex", lambda self, *a: not self._flex_failed)
    case, name = CASES[0]
    attn = _module(case, name)
    attn.method = "auto"
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    layout = attn.layout_for(case.seq_len, case.heads)
    with pytest.warns(RuntimeWarning, match="FlexAttention failed .*no kernel for this GPU.*gather path"):
        result = check_attention(
            compiled, case, torch.float64, reference_options={"block_layout": layout, "block_size": 8}
        )
    assert attn.last_method == "gather" and attn._flex_failed
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"
