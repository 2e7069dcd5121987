"""The strips benchmark's counts of work (tools/bench/blocksparse_strips.py): the pairs a layout keeps and the pairs in
the tiles the kernels visit, which explain a row's time against plain dilated attention."""

from __future__ import annotations

import torch

from ring_blocksparse import build_pattern
from ring_blocksparse.strip_ring import build_strip_plan
from ring_core.dilated import branches
from tools.bench.blocksparse_strips import kept_pairs, visited_pairs

N, H, BLOCK, SEGMENTS, RATES = 256, 4, 16, (64, 128), (1, 2)


def _plan(layout, tile=None, causal=False):
    return build_strip_plan(
        seq_len=N, rank=0, world_size=1, layout_kind="contiguous", q=torch.zeros(1, N, H, 8), num_heads=H,
        num_kv_heads=H, branch_list=branches(SEGMENTS, RATES, "lse", H), block_size=BLOCK, layout=layout,
        causal=causal, masks=False, tile=tile,
    )  # fmt: skip


def test_tiles_of_one_layout_block_visit_only_kept_pairs():
    """Off CUDA each strip's tile is one layout block (b / r rows): a scattered layout's tiles are all full or empty,
    so the kernels visit exactly the kept pairs; tiles of 16 strip rows (two layout blocks at rate 2) visit more,
    partly through partial tiles."""
    layout = build_pattern("random", density=0.25, seed=1).layout(N, BLOCK)
    fine, coarse = _plan(layout), _plan(layout, tile=16)
    kept = kept_pairs(fine)
    assert kept_pairs(coarse) == kept
    assert visited_pairs(fine) == (kept, 0)
    visited, partial = visited_pairs(coarse)
    assert visited > kept and 0 < partial <= visited


def test_without_a_layout_every_pair_of_the_branches_is_visited():
    """No layout: the branches' pairs, all in full tiles (segments are multiples of the tiles); causal halves them
    on the diagonal tiles' partial halves."""
    plan = _plan(None)
    # each branch (merged by lse: every head): N/r query rows of a head's offset, each seeing s/r keys
    expected = sum(N // r * (s // r) * H for s, r in zip(SEGMENTS, RATES))
    assert kept_pairs(plan) == expected
    assert visited_pairs(plan) == (expected, 0)
    causal = _plan(None, causal=True)
    visited, partial = visited_pairs(causal)
    assert kept_pairs(causal) < visited < expected and partial > 0
