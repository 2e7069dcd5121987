"""Packed documents on flash-attn 4's strip calls, on the CPU.

flash-attn 4 never runs here. A stand-in kernel computes exactly what flash-attn 4 is given: the block lists
(full tiles unmasked, partial tiles through the ``mask_mod``'s torch twin over the aux tensors), forward with
its lse and backward from the final ``out``/``lse`` with the transposed lists. Calls of packed documents get
their per-call cut (the tiles and segment ids of their documents) as those lists and aux tensors; through the
stand-in, the whole strip path (batches, merges, gradients, the flex calls beside it) must equal the float64
reference. The kernel itself runs in tests/blocksparse/test_fa4_cuda.py.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from tests.blocksparse.test_fa4_rule import TILE, _grid, _Lists, _tiles_to_tokens
from tests.blocksparse.test_strip_windows import PATTERNS

from ring_blocksparse import BlockSparseRingDilatedAttention, build_pattern, fa4, strided
from ring_blocksparse.fa4 import Fa4Blocks, Fa4FallbackWarning, blocks_for, fa4_forward
from ring_blocksparse.fa4_rule import Fa4Rule, twin
from ring_blocksparse.flex import call_cuts, math_strip_attention
from ring_blocksparse.strided import strip_calls
from ring_core import reference_attention
from ring_core.dilated import branches
from ring_core.testing import Case, check_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _tokens(lists: _Lists, rule: Fa4Rule | None, index: int, rows: int, cols: int, transposed: bool) -> torch.Tensor:
    """Bool ``(h, rows, cols)``: what flash-attn 4 computes at batch ``index`` of ``lists`` (per key tile when
    ``transposed``, the backward's)."""
    pick = 0 if lists.full_block_cnt.shape[0] == 1 else index
    grids = []
    for kind in ("full", "mask"):
        counts, indices = getattr(lists, f"{kind}_block_cnt"), getattr(lists, f"{kind}_block_idx")
        grid = _grid(counts[pick : pick + 1], indices[pick : pick + 1], (rows if transposed else cols) // TILE)
        grids.append(_tiles_to_tokens(grid.transpose(1, 2) if transposed else grid))
    full, partial = grids
    assert not (full & partial).any()
    if rule is None:
        return full | partial
    heads = torch.arange(full.shape[0])[:, None, None]
    return full | (partial & twin(rule)(index, heads, torch.arange(rows)[:, None], torch.arange(cols)))


class StandIn:
    """flash-attn 4's interface as the strip path calls it, computing in the inputs' dtype what the kernel would."""

    forward_calls: ClassVar[int] = 0
    backward_calls: ClassVar[int] = 0

    @staticmethod
    def _scores(q, k, lists, scale, mask_mod, aux_tensors, transposed):
        rule = None if mask_mod is None else Fa4Rule(mask_mod.endswith("layout"), tuple(aux_tensors))
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # (grouped-query heads)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
        n, m = q.shape[1], k.shape[1]
        allowed = torch.stack([_tokens(lists, rule, b, n, m, transposed) for b in range(q.shape[0])])
        return scores.masked_fill(~allowed, float("-inf")), k

    @classmethod
    def _flash_attn_fwd(cls, q, k, v, *, softmax_scale, causal, block_sparse_tensors, return_lse, **rule):
        assert not causal and return_lse
        cls.forward_calls += 1
        scores, _ = cls._scores(q, k, block_sparse_tensors, softmax_scale, transposed=False, **rule)
        lse = scores.logsumexp(-1)
        probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)  # (rows that see no key: lse -inf)
        v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
        return torch.einsum("bhnm,bmhd->bnhd", probs, v), lse

    @classmethod
    def _flash_attn_bwd(cls, q, k, v, out, dout, lse, *, softmax_scale, causal, block_sparse_tensors, **rest):
        assert not causal
        cls.backward_calls += 1
        outputs = rest.pop("dk", None), rest.pop("dv", None)
        scores, wide_k = cls._scores(q, k, block_sparse_tensors, softmax_scale, transposed=True, **rest)
        probs = torch.exp(scores - lse[..., None].to(scores.dtype))  # (lse +inf where a row sees no key)
        group = q.shape[2] // k.shape[2]
        wide_v = v.repeat_interleave(group, dim=2)
        dv = torch.einsum("bhnm,bnhd->bmhd", probs, dout)
        dprobs = torch.einsum("bnhd,bmhd->bhnm", dout, wide_v)
        dscores = probs * (dprobs - (dout * out).sum(-1).transpose(1, 2)[..., None]) * softmax_scale
        dq = torch.einsum("bhnm,bmhd->bnhd", dscores, wide_k)
        dk = torch.einsum("bhnm,bnhd->bmhd", dscores, q)
        dk, dv = (x.unflatten(2, (k.shape[2], group)).sum(3) for x in (dk, dv))
        if outputs[0] is not None:
            outputs[0].copy_(dk)
            outputs[1].copy_(dv)
            dk, dv = outputs
        return dq, dk, dv


@pytest.fixture
def stand_in(monkeypatch):
    """The strip path on the CPU as on a Hopper GPU with flash-attn 4 installed, the kernel being :class:`StandIn`."""
    monkeypatch.setattr(fa4, "_interface", lambda: (StandIn, _Lists))
    cute = SimpleNamespace(strip_rule="cute strip_rule", strip_rule_layout="cute strip_rule_layout")
    monkeypatch.setattr("ring_blocksparse.fa4_rule._cute_module", lambda: cute)
    monkeypatch.setattr(fa4, "_REJECTED", set())
    # (FlexAttention has no backward on the CPU: its calls run on its dense twin, sparse_kernel="math")
    monkeypatch.setattr(strided, "_may_use_fa4", lambda run, call, q: call.run is None)
    monkeypatch.setattr(strided, "rule_ready", lambda q: True)
    StandIn.forward_calls = StandIn.backward_calls = 0
    return StandIn


# block 128 (flash-attn 4's tile): on the CPU the rate-1 calls take 128-row tiles (flash-attn 4), the others one
# layout block of their strip (FlexAttention); documents starting anywhere, an empty one, crossing tiles and segments
CASES = [
    (
        Case("dilated-gqa-random", 640, 4, (256, 640), (1, 2), kv_heads=2, batch=1, head_dim=8,
             documents=(0, 100, 100, 333, 640)),
        "random-per-head",
    ),
    (
        Case("causal-band-window", 512, 3, (512,), (1,), batch=1, head_dim=8, causal=True, window_size=(150, 0),
             documents=(0, 7, 300, 512)),
        "band",
    ),
    (Case("segments-only", 640, 2, (128, 640), (1, 4), batch=1, head_dim=8, documents=(0, 129, 431, 640)), "none"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name"), CASES, ids=[case.name for case, _ in CASES])
def test_packed_documents_on_flash_attn4_match_reference(case, name, stand_in):
    """Forward and backward (float32, as the kernel's lse) against the float64 reference, the rate-1 calls on
    flash-attn 4 with their cuts, none falling back."""
    pattern, options = PATTERNS[name]
    attn = BlockSparseRingDilatedAttention(**case.config, block_size=128, pattern=pattern, method="flex", **options)
    attn.sparse_kernel = "math"
    layout = attn.layout_for(case.seq_len, case.heads)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Fa4FallbackWarning)
        result = check_attention(
            attn, case, torch.float32, reference_options={"block_layout": layout, "block_size": 128}
        )
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"
    assert stand_in.forward_calls and stand_in.backward_calls
    assert all(c.fa4 is None for c in attn.last_plan.calls[0])  # (no call's lists kept: they are per forward)


def test_the_stand_in_can_fail(stand_in, monkeypatch):
    """Lists whose partial tiles ignore the documents (the plan's rule, not the cut's segment ids) are caught."""
    case, name = CASES[0]
    real = fa4.rule_tensors
    monkeypatch.setattr(fa4, "rule_tensors", lambda rule, layout, segments=None: real(rule, layout))
    pattern, options = PATTERNS[name]
    attn = BlockSparseRingDilatedAttention(**case.config, block_size=128, pattern=pattern, method="flex", **options)
    attn.sparse_kernel = "math"
    layout = attn.layout_for(case.seq_len, case.heads)
    result = check_attention(attn, case, torch.float32, reference_options={"block_layout": layout, "block_size": 128})
    assert not result.passed and stand_in.forward_calls


def test_a_rejected_call_of_documents_falls_back_to_its_cut(stand_in, monkeypatch):
    """flash-attn 4 rejecting a call of packed documents: FlexAttention computes it under its cut (not the plan's
    block mask, which such calls do not have), exactly, with one warning."""

    def rejects(*args, **kwargs):
        raise RuntimeError("mask_mod did not compile")

    monkeypatch.setattr(stand_in, "_flash_attn_fwd", rejects)
    n, h, documents = 768, 2, torch.tensor([0, 300, 301, 768], dtype=torch.int32)
    layout = build_pattern("random", density=0.5, seed=2).layout(n, 128, h)
    calls = strip_calls(
        torch.arange(n), torch.arange(n), num_heads=h, num_kv_heads=h, branch_list=branches((768,), (1,), "lse", h),
        block_size=128, layout=layout, causal=False, q=torch.zeros(1, n, h, 8), dense=False, documents=True,
    )  # fmt: skip
    (call,), (cut,) = calls, call_cuts(calls, None, documents)
    assert call.block_mask is None and cut is not None
    blocks = blocks_for(call, torch.device("cpu"), rule=True, cut=cut)
    assert isinstance(blocks, Fa4Blocks) and blocks.cut is cut and blocks.rule is not None
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, h, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    with pytest.warns(Fa4FallbackWarning, match="rejected"):
        out, lse = fa4_forward(call, blocks, q, k, v, scale=0.3)
    views = [x.transpose(1, 2) for x in (q, k, v)]
    expected, expected_lse = math_strip_attention(*views, call.tiles, call.rule, scale=0.3, enable_gqa=False, cut=cut)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    torch.testing.assert_close(lse, expected_lse)
    whole = reference_attention(
        q, k, v, softmax_scale=0.3, block_layout=layout, block_size=128, cu_seqlens=documents, return_lse=True
    )
    torch.testing.assert_close(out, whole[0])
    torch.testing.assert_close(lse, whole[1])
