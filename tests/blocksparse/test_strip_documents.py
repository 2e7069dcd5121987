"""Packed documents (``cu_seqlens``) on the strip path vs the float64 reference, forward and backward.

Segments, offsets, windows and causality restart at every document, the layout indexes global positions
(SPEC.md). The strips take them (one process and the sparse ring over gloo): the plan ignores segments, a
dilated branch reads each document on the strip its start selects, and each call reads its rows' segment ids
(:func:`ring_blocksparse.flex.document_segments`, :func:`ring_blocksparse.strips.cut_grids`). As in
tests/blocksparse/test_strip_windows.py the CPU runs the fused kernel's dense twin (``sparse_kernel =
"math"``: the same per-call tiles and rule) and the eager FlexAttention forward; the fused kernel runs
in tests/blocksparse/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from tests.blocksparse.ring_helpers import assert_rows_match, ring_inputs, run_shard
from tests.blocksparse.test_strip_windows import PATTERNS, _module
from tests.distributed_helpers import run_distributed

from ring_blocksparse import build_pattern
from ring_blocksparse.flex import document_segments
from ring_blocksparse.strips import Tiles, cut_grids
from ring_core import reference_attention
from ring_core.sharding import shard_sequence
from ring_core.testing import Case, check_attention, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# documents starting at multiples of every rate, then anywhere; empty ones and ones crossing layout blocks and
# segment boundaries included
CASES = [
    (Case("one-branch-causal", 64, 4, (64,), (1,), batch=1, causal=True, documents=(0, 5, 5, 29, 64)), "band"),
    (
        Case("dilated-gqa", 72, 4, (12, 24, 72), (1, 2, 4), kv_heads=2, batch=1, head_dim=5,
             documents=(0, 20, 36, 72)),
        "random-per-head",
    ),
    (
        Case("dilated-causal-window", 64, 3, (16, 64), (1, 2), batch=1, head_dim=5, causal=True, window_size=(9, 0),
             documents=(0, 14, 50, 64)),
        "band",
    ),
    (
        Case("head-groups-padded", 64, 4, (8, 32, 64), (1, 2, 4), merge="head_groups", batch=1, head_dim=3,
             padding=True, documents=(0, 28, 28, 64)),
        "random-per-head",
    ),
    (Case("short-documents", 48, 2, (16, 48), (1, 2), batch=1, documents=(0, 2, 4, 10, 30, 48)), "none"),
    # documents starting anywhere: each head offset's rows of a document lie on the strip of (start + offset) % rate
    (
        Case("off-rate-dilated-gqa", 72, 4, (12, 24, 72), (1, 2, 4), kv_heads=2, batch=1, head_dim=5,
             documents=(0, 7, 30, 53, 72)),
        "random-per-head",
    ),
    (
        Case("off-rate-causal-window", 64, 3, (16, 64), (1, 4), batch=1, head_dim=5, causal=True, window_size=(9, 0),
             documents=(0, 13, 13, 38, 61, 64)),
        "band",
    ),
    (
        Case("off-rate-head-groups-padded", 64, 5, (8, 32, 64), (1, 2, 4), merge="head_groups", batch=1, head_dim=3,
             padding=True, documents=(0, 3, 21, 50, 64)),
        "random-per-head",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name"), CASES, ids=[case.name for case, _ in CASES])
def test_packed_documents_on_the_strips_match_reference(case, name):
    attn = _module(case, name)
    layout = attn.layout_for(case.seq_len, case.heads)
    result = check_attention(attn, case, torch.float64, reference_options={"block_layout": layout, "block_size": 8})
    assert attn.last_method == "flex"
    assert all(c.block_mask is None and c.run is None for c in attn.last_plan.calls[0])  # (per call, never dense)
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


@pytest.mark.parametrize(
    ("case", "name"), CASES[2:4] + CASES[6:], ids=[case.name for case, _ in CASES[2:4] + CASES[6:]]
)
def test_packed_documents_on_flex_backward_kernel_match_reference(case, name, backward_operator):
    """Eager FlexAttention forward, FlexAttention's backward operator on the final out and lse (its dense form on
    the CPU), each call's per-document cut and padding in both: float64 vs the reference, forward and backward."""
    attn = _module(case, name)
    attn.sparse_kernel = "flex"
    layout = attn.layout_for(case.seq_len, case.heads)
    result = check_attention(attn, case, torch.float64, reference_options={"block_layout": layout, "block_size": 8})
    assert attn.last_method == "flex"
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def test_packed_documents_on_flex_forward_match_reference():
    """The eager FlexAttention forward (the per-call block masks, not the dense twin)."""
    case, name = CASES[2]
    attn = _module(case, name)
    attn.sparse_kernel = "flex"
    q, k, v, _ = make_inputs(case, torch.float64, "cpu", 0)
    with torch.no_grad():
        out = attn(q, k, v, is_causal=case.causal, **case.forward_options())
    assert attn.last_method == "flex"
    expected = reference_attention(
        q, k, v, **case.config, is_causal=case.causal, block_layout=attn.layout_for(case.seq_len, case.heads),
        block_size=8, cu_seqlens=torch.tensor(case.documents),
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_document_segments_restart_at_every_document():
    bounds = torch.tensor([0, 5, 5, 12, 20], dtype=torch.int32)
    ids = document_segments(torch.arange(20, dtype=torch.int32), bounds, 4)
    expected = [0] * 4 + [1] + [5] * 4 + [6] * 3 + [12] * 4 + [13] * 4
    assert ids.tolist() == expected
    # a rate-2 call of phase 1 serves the document starting at 5 only (its strip of offset 1: rows 5, 7, 9, 11)
    served = document_segments(torch.arange(1, 20, 2, dtype=torch.int32), bounds, 4, rate=2, phase=1, outside=-2)
    assert served.tolist() == [-2, -2, 5, 5, 6, 6, -2, -2, -2, -2]


def test_only_the_calls_some_document_needs_run():
    """Per head offset, a call per strip of its rate; a call runs when a non-empty document starts at its phase."""
    from ring_blocksparse.strided import document_calls, strip_calls
    from ring_core.dilated import branches

    q = torch.zeros(1, 64, 4, 8)
    calls = strip_calls(
        torch.arange(64), torch.arange(64), num_heads=4, num_kv_heads=4, branch_list=branches((32, 64), (1, 4), "lse", 4),
        block_size=8, layout=None, causal=False, q=q, documents=True, tile=4,
    )  # fmt: skip
    assert sorted((c.q.rate, c.phase) for c in calls) == [(1, 0)] + [(4, p) for p in range(4) for _ in range(4)]
    needed = document_calls(calls, (0, 8, 8, 21, 64))  # non-empty documents start at 0, 8 and 21: phases 0 and 1
    assert sorted({(c.q.rate, c.phase) for c in needed}) == [(1, 0), (4, 0), (4, 1)]
    assert document_calls(calls, None) is calls


def test_cut_grids_cut_full_tiles_at_documents():
    """A tile full in the plan holding two documents becomes partial; a pair of tiles in different documents
    is skipped; one document's tiles stay full."""
    full = torch.ones(1, 3, 3, dtype=torch.bool)
    tiles = Tiles(full, torch.zeros_like(full), full, unit=4, tile=4, needs_layout=False, needs_segment=False,
                  one_segment_units=True)  # fmt: skip
    ids = torch.tensor([0, 0, 0, 0, 0, 0, 6, 6, 8, 8, 8, 8])  # rows 0-5: document 0; 6-7; 8-11
    got_full, got_partial = cut_grids(tiles.full, tiles.partial, tiles.tile, segments=(ids, ids))
    assert got_full[0].tolist() == [[True, False, False], [False, False, False], [False, False, True]]
    assert got_partial[0].tolist() == [[False, True, False], [True, True, False], [False, False, False]]
    # rows a call does not serve (negative ids) make a tile partial, or skipped when no row is served
    served = torch.tensor([0, 0, 0, 0, -1, 0, 6, 6, -1, -1, -1, -1])
    got_full, got_partial = cut_grids(tiles.full, tiles.partial, tiles.tile, segments=(served, served))
    assert got_full[0].tolist() == [[True, False, False], [False, False, False], [False, False, False]]
    assert got_partial[0].tolist() == [[False, True, False], [True, True, False], [False, False, False]]


# name: segments, rates, heads, kv heads, pattern, causal, window, documents (starting at multiples of the rates,
# crossing the shards of 2 and 3 ranks in both layouts)
RING = {
    "dilated-gqa": ((24, 96), (1, 2), 4, 2, "random-per-head", False, (-1, -1), (0, 10, 40, 70, 96)),
    "causal-window": ((32, 96), (1, 4), 2, 2, "band", True, (13, 0), (0, 4, 4, 52, 96)),
    "off-rate": ((24, 48, 96), (1, 2, 4), 4, 2, "random-per-head", True, (-1, -1), (0, 9, 31, 47, 70, 96)),
    # no document crosses the contiguous shards of 2 or 3 ranks: nothing travels (zigzag: the last one does)
    "inside-shards": ((24, 96), (1, 2), 2, 2, "band", False, (-1, -1), (0, 20, 32, 48, 64, 96)),
}


def _ring_inputs(name: str):
    _, _, h, hkv, *_ = RING[name]
    return ring_inputs(len(name), 1, 96, h, hkv)


def _ring_rank(rank: int, world_size: int, layouts: list[str]) -> dict:
    results = {}
    for layout in layouts:
        for name, (segments, rates, _, _, pattern, causal, window, documents) in RING.items():
            attn = _module(Case(name, 96, 1, segments, rates, window_size=window), pattern, layout=layout)
            results[layout, name] = run_shard(
                attn, _ring_inputs(name), rank, world_size, layout, is_causal=causal, cu_seqlens=torch.tensor(documents)
            )
    return results


@pytest.mark.distributed
@pytest.mark.parametrize(("world_size", "layouts"), [(2, ["contiguous", "zigzag"]), (3, ["contiguous"])])
def test_ring_with_packed_documents(world_size, layouts):
    """The sparse ring on the strips with documents crossing shards (real gloo ranks): exact on every rank; rows of
    documents without a query on the receiving rank do not travel."""
    by_rank = run_distributed(_ring_rank, world_size, layouts, timeout=300)
    for layout in layouts:
        for name, (segments, rates, h, _, pattern, causal, window, documents) in RING.items():
            q, k, v, dout = _ring_inputs(name)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            pattern_name, options = PATTERNS[pattern]
            block_layout = build_pattern(pattern_name, **options).layout(96, 8, h)
            expected = reference_attention(
                *leaves, segment_lengths=segments, dilation_rates=rates, is_causal=causal, window_size=window,
                block_layout=block_layout, block_size=8, cu_seqlens=torch.tensor(documents),
            )  # fmt: skip
            expected_grads = torch.autograd.grad(expected, leaves, dout)
            for rank, result in enumerate(by_rank):
                got = result[layout, name]
                assert_rows_match(got, expected, expected_grads, rank, world_size, layout)
                sent = sum(got["sent"].values())
                assert sent > 0 or name == "inside-shards"
                assert sent == 0 or (name, layout) != ("inside-shards", "contiguous")


def test_return_lse_with_packed_documents_on_the_strips():
    """``return_lse=True`` with documents: the lse (every row restarts at its document) and its gradient, exact."""
    case, name = CASES[2]
    attn = _module(case, name)
    q, k, v, _ = make_inputs(case, torch.float64, "cpu", 3)
    gen = torch.Generator().manual_seed(5)
    d_out = torch.randn(q.shape, dtype=torch.float64, generator=gen)
    d_lse = torch.randn(1, case.heads, case.seq_len, dtype=torch.float64, generator=gen)
    results = []
    for run in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        if run:
            out, lse = attn(*leaves, is_causal=case.causal, return_lse=True, **case.forward_options())
            assert attn.last_method == "flex"
        else:
            out, lse = reference_attention(
                *leaves, **case.config, is_causal=case.causal, return_lse=True, cu_seqlens=torch.tensor(case.documents),
                block_layout=attn.layout_for(case.seq_len, case.heads), block_size=8,
            )  # fmt: skip
        loss = (out * d_out).sum() + torch.where(torch.isfinite(lse), lse * d_lse, 0).sum()
        results.append([out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_a_plan_for_documents_never_takes_the_received_rows_as_covered():
    """Per head offset the calls of a plan for documents split by phase, and only the phases some document needs
    run: rows of the others are not written, so the ring must zero the gradient buffers it sends back."""
    from ring_blocksparse.strip_ring import build_strip_plan, disjoint_and_covering
    from ring_core.dilated import branches

    plan = build_strip_plan(
        seq_len=96, rank=0, world_size=2, layout_kind="contiguous", q=torch.empty(1, 48, 2, 4), num_heads=2,
        num_kv_heads=2, branch_list=branches((96,), (2,), "lse", 2), block_size=8, layout=None, causal=False,
        documents=True,
    )  # fmt: skip
    # every phase's calls together write each received row on each key/value head once ...
    assert disjoint_and_covering(plan.calls[1], plan.recv_rows[1], 48, 2) == (True, True)
    # ... but a call runs only when a document starts at its phase: not taken as covered
    assert plan.key_views[1] == (True, False)


def _padded_ring_rank(rank: int, world_size: int, mask: torch.Tensor) -> dict:
    segments, rates, _, _, pattern, causal, window, documents = RING["off-rate"]
    attn = _module(Case("padded", 96, 1, segments, rates, window_size=window), pattern)
    local_mask = shard_sequence(mask, "contiguous", rank=rank, world_size=world_size)
    return run_shard(
        attn, _ring_inputs("off-rate"), rank, world_size, "contiguous", is_causal=causal,
        key_padding_mask=local_mask, cu_seqlens=torch.tensor(documents),
    )  # fmt: skip


@pytest.mark.distributed
def test_ring_with_packed_documents_and_padding():
    """Packed documents and padded keys together on the ring (the padding flags travel with the rows the documents
    keep): exact on every rank."""
    segments, rates, h, _, pattern, causal, window, documents = RING["off-rate"]
    mask = torch.rand(1, 96, generator=torch.Generator().manual_seed(5)) < 0.3
    by_rank = run_distributed(_padded_ring_rank, 2, mask, timeout=300)
    q, k, v, dout = _ring_inputs("off-rate")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    pattern_name, options = PATTERNS[pattern]
    expected = reference_attention(
        *leaves, segment_lengths=segments, dilation_rates=rates, is_causal=causal, window_size=window,
        key_padding_mask=mask, block_layout=build_pattern(pattern_name, **options).layout(96, 8, h), block_size=8,
        cu_seqlens=torch.tensor(documents),
    )  # fmt: skip
    grads = torch.autograd.grad(expected, leaves, dout)
    for rank, result in enumerate(by_rank):
        assert_rows_match(result, expected, grads, rank, 2, "contiguous")
        assert sum(result["sent"].values()) > 0


def test_cuts_batched_over_calls_equal_each_call_alone():
    """call_cuts builds the cuts of all calls of one shape at once: each equals its call's own, padding too."""
    from ring_blocksparse.flex import call_cuts, tile_cut
    from ring_blocksparse.strided import strip_calls
    from ring_core.dilated import branches

    q = torch.zeros(2, 96, 4, 8)
    calls = strip_calls(
        torch.arange(96), torch.arange(96), num_heads=4, num_kv_heads=4, branch_list=branches((24, 96), (1, 4), "lse", 4),
        block_size=8, layout=build_pattern("random", density=0.6, seed=1).layout(96, 8, 4), causal=True, q=q,
        documents=True, padded=True, tile=2,
    )  # fmt: skip
    bounds = torch.tensor([0, 7, 30, 31, 61, 96], dtype=torch.int32)
    pad = torch.rand(2, 96, generator=torch.Generator().manual_seed(0)) < 0.2
    cuts = call_cuts(calls, pad, bounds)
    assert sum(c.q.rate == 4 for c in calls) > 1  # (a batch of several calls)
    for call, cut in zip(calls, cuts):
        segments = tuple(
            document_segments(pos, bounds, call.segment, call.q.rate, call.phase, outside)
            for pos, outside in ((call.rule.qpos, -1), (call.rule.kpos, -2))
        )
        alone = tile_cut(call.tiles.full, call.tiles.partial, call.tiles.tile, pad[:, call.k.rows], segments)
        for got, expected in zip(
            (cut.full, cut.partial, *cut.lists, *cut.segments), (alone.full, alone.partial, *alone.lists, *segments)
        ):
            assert torch.equal(got, expected)
