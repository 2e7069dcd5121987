"""Sliding windows and key padding on the strip path vs the float64 reference, forward and backward.

As in tests/blocksparse/test_strided.py, the CPU runs the strips through the fused kernel's dense twin
(``sparse_kernel = "math"``: the same tiles, per-call padded tiles and token rule), the eager
FlexAttention forward on the same block masks, and the ring over real gloo processes; the fused
kernel itself runs in tests/blocksparse/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from tests.blocksparse.ring_helpers import assert_rows_match, run_shard
from tests.distributed_helpers import run_distributed

from ring_blocksparse import BlockSparseRingDilatedAttention, build_pattern, flex, strided
from ring_blocksparse.attention import dense_strip_kernel
from ring_blocksparse.fa4 import tile_grids
from ring_blocksparse.strips import classify, cut_grids, strip_of
from ring_core import reference_attention
from ring_core.dilated import branches
from ring_core.sharding import shard_sequence
from ring_core.testing import Case, check_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PATTERNS = {
    "random-per-head": ("random", {"density": 0.5, "seed": 4, "per_head": True}),
    "band": ("local_window", {"window": 20, "sliding": True}),
    "none": (None, {}),
}


def _module(case: Case, name: str, block: int = 8, **extra) -> BlockSparseRingDilatedAttention:
    pattern, options = PATTERNS[name]
    attn = BlockSparseRingDilatedAttention(
        **case.config, block_size=block, pattern=pattern, method="flex", **options, **extra
    )
    attn.sparse_kernel = "math"
    return attn


# (case, pattern): windows (w, -1), (w, 0) causal, two-sided, right-only; dilation, GQA, both merges, padding
CASES = [
    (Case("left-dilated-gqa", 72, 4, (12, 32, 72), (1, 2, 4), kv_heads=2, head_dim=5, window_size=(5, -1)), "none"),
    (Case("causal-band", 72, 3, (24, 72), (1, 2), head_dim=5, causal=True, window_size=(13, 0)), "band"),
    (
        Case("two-sided-layout-gqa", 64, 6, (16, 64), (1, 2), kv_heads=3, head_dim=3, window_size=(9, 4)),
        "random-per-head",
    ),
    (Case("right-only-causal", 48, 2, (48,), (1,), head_dim=5, causal=True, window_size=(-1, 6)), "none"),
    (
        Case("head-groups", 64, 5, (8, 32, 64), (1, 2, 4), merge="head_groups", head_dim=3, window_size=(7, 7)),
        "random-per-head",
    ),
    (Case("pad-dilated-gqa", 72, 4, (12, 32, 72), (1, 2, 4), kv_heads=2, head_dim=5, padding=True), "none"),
    (Case("pad-causal-layout", 64, 3, (16, 64), (1, 2), head_dim=5, causal=True, padding=True), "random-per-head"),
    (
        Case("pad-window-causal", 72, 6, (24, 72), (1, 4), kv_heads=3, head_dim=3, causal=True, padding=True,
             window_size=(11, 0)),
        "band",
    ),
    (
        Case("pad-window-two-sided-head-groups", 64, 4, (16, 64), (1, 2), merge="head_groups", head_dim=5,
             padding=True, window_size=(6, 3)),
        "random-per-head",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("case", "name"), CASES, ids=[case.name for case, _ in CASES])
def test_windows_and_padding_match_reference(case, name):
    attn = _module(case, name)
    layout = attn.layout_for(case.seq_len, case.heads)
    result = check_attention(attn, case, torch.float64, reference_options={"block_layout": layout, "block_size": 8})
    assert attn.last_method == "flex"
    calls = attn.last_plan.calls[0]
    assert all(c.tiles.padded == case.padding for c in calls)
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def _edge_inputs():
    """Batch 3: element 1 has every key padded; element 2 pads keys 24..29, so under a (3, 0) causal window
    queries 27..29 have no allowed key."""
    generator = torch.Generator().manual_seed(11)
    q, dout = (torch.randn(3, 48, 4, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(3, 48, 2, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(3, 48, generator=generator) < 0.3
    mask[1] = True
    mask[2, 24:30] = True
    return q, k, v, dout, mask


@pytest.mark.parametrize("kernel", ["math", "gather"])
def test_padded_rows_and_queries_with_no_key(kernel):
    """A batch element whose keys are all padded, and queries whose window holds only padded keys: output 0 and
    zero gradients there, everything else the reference (and the gather path agrees)."""
    q, k, v, dout, mask = _edge_inputs()
    config = {"segment_lengths": [16, 48], "dilation_rates": [1, 2], "window_size": (3, 0)}
    attn = BlockSparseRingDilatedAttention(**config, block_size=8, method="flex" if kernel == "math" else "gather")
    attn.sparse_kernel = "math"
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attn(*leaves, is_causal=True, key_padding_mask=mask)
    out.backward(dout)
    assert attn.last_method == ("flex" if kernel == "math" else "gather")
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(*ref_leaves, **config, is_causal=True, key_padding_mask=mask)
    expected.backward(dout)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for leaf, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-9, atol=1e-11)
    assert out[1].abs().max() == 0 and out[2, 27:30].abs().max() == 0
    assert leaves[0].grad[1].abs().max() == 0 and leaves[1].grad[1].abs().max() == 0


def test_eager_flex_forward_with_windows_and_padding():
    """The eager FlexAttention kernel on the same block masks (the padding read per batch element in the rule)."""
    q, k, v, _, mask = _edge_inputs()
    config = {"segment_lengths": [16, 48], "dilation_rates": [1, 2], "window_size": (5, 2)}
    layout = build_pattern("random", density=0.6, seed=1, per_head=True).layout(48, 8, 4)
    attn = BlockSparseRingDilatedAttention(**config, block_size=8, block_layout=layout, method="flex")
    attn.sparse_kernel = "flex"
    for causal in (False, True):
        with torch.no_grad():
            out = attn(q, k, v, is_causal=causal, key_padding_mask=mask)
        assert attn.last_method == "flex"
        expected = reference_attention(
            q, k, v, **config, is_causal=causal, key_padding_mask=mask, block_layout=layout, block_size=8
        )
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rate", [1, 2])
@pytest.mark.parametrize(("window", "causal"), [((5, -1), False), ((11, 0), True), ((4, 9), False), ((-1, 3), True)])
def test_window_tiles_are_exact(window, causal, rate):
    """Brute force: with a window, a full tile has every pair allowed, a skipped one none (nothing is computed for
    tiles outside the window), and the window is read in partial tiles exactly when it cuts one."""
    n, block, tile = 128, 8, 8 // rate
    layout = build_pattern("random", density=0.6, seed=3).layout(n, block)
    strip = strip_of(torch.arange(n), rate - 1, rate)
    pos = strip.positions
    for segment in (32, 128):
        tiles = classify(
            strip, strip, layout, block_size=block, segment=segment, causal=causal, tile=tile, window=window
        )
        same = layout[0][pos[:, None] // block, pos[None, :] // block] & (pos[:, None] // segment == pos // segment)
        offset = pos[None, :] - pos[:, None]
        inside = torch.ones_like(same)
        if window[0] >= 0:
            inside &= offset >= -window[0]
        if window[1] >= 0:
            inside &= offset <= window[1]
        if causal:
            inside &= offset <= 0
        per_tile = (same & inside).unflatten(0, (-1, tile)).unflatten(2, (-1, tile))
        assert torch.equal(tiles.full[0], per_tile.all(3).all(1))
        assert torch.equal(tiles.full[0] | tiles.partial[0], per_tile.any(3).any(1))
        visited = int((tiles.full | tiles.partial).sum())
        assert visited < (n // rate // tile) ** 2 // 2  # a band of tiles, not the square
        # the window's own cuts (causality's are not the window's), to be read in partial tiles
        cut = tiles.partial[0].repeat_interleave(tile, 0).repeat_interleave(tile, 1) & same & ~inside
        if causal:
            cut &= offset <= 0
        assert tiles.needs_window or not cut.any()


def test_padded_tiles_are_partial_or_skipped():
    """Per call, a full tile with a padded key (of any batch element) becomes partial, a tile whose keys are padded
    in every batch element is skipped, and the others keep their class."""
    strip = strip_of(torch.arange(64), 0, 1)
    tiles = classify(strip, strip, None, block_size=8, segment=64, causal=True, tile=8, padded=True)
    pad = torch.zeros(2, 64, dtype=torch.bool)
    pad[0, 17] = True  # key tile 2: some padded
    pad[:, 40:48] = True  # key tile 5: all padded, every batch element
    pad[1, 56:64] = True  # key tile 7: all padded in one element only
    full, partial = cut_grids(tiles.full, tiles.partial, tiles.tile, pad)
    assert not (full[:, :, [2, 5, 7]]).any() and not partial[:, :, 5].any()
    assert torch.equal(partial[:, :, 2], (tiles.full | tiles.partial)[:, :, 2])
    assert torch.equal(partial[:, :, 7], (tiles.full | tiles.partial)[:, :, 7])
    keep = [0, 1, 3, 4, 6]
    assert torch.equal(full[:, :, keep], tiles.full[:, :, keep])
    assert torch.equal(partial[:, :, keep], tiles.partial[:, :, keep])


def test_windowed_strips_compute_only_window_tiles(monkeypatch):
    """Counting the tiles the FlexAttention calls are given: a (w, 0) causal window over N = 256 visits the band of
    tiles it reaches, for every branch offset, and with padding the tiles whose keys are all padded drop out."""
    seen = []
    real = flex.flex_strip_attention

    def counting(q, k, v, block_mask, **options):
        seen.append(int(block_mask.kv_num_blocks.sum()) + int(block_mask.full_kv_num_blocks.sum()))
        return real(q, k, v, block_mask, **options)

    monkeypatch.setattr(flex, "flex_strip_attention", counting)
    n = 256
    attn = BlockSparseRingDilatedAttention([64, 256], [1, 2], block_size=8, window_size=(10, 0), method="flex")
    attn.sparse_kernel = "flex"
    q = torch.randn(1, n, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        attn(q, q, q, is_causal=True)
    # rate 1 (32 tiles of 8 rows): each query tile reaches itself and the 2 tiles before (10 back), less the 3
    # pairs across each of the 3 segment boundaries (every 8 tiles); rate 2, one segment (32 tiles of 4 strip
    # rows = 8 positions; 10 positions back are 5 rows: 2 tiles back), for each of its 2 offsets (one batched call)
    assert seen == [3 * 32 - 3 - 3 * 3, 2 * (3 * 32 - 3)]
    seen.clear()
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, 64:128] = True  # key tiles 8..15 of every strip, in the only batch element: skipped
    with torch.no_grad():
        attn(q, q, q, is_causal=True, key_padding_mask=mask)
    # rate 1: key tiles 8..15 are segment 1, where they had 1 + 2 + 6 * 3 pairs; rate 2: 3 pairs each
    assert seen == [84 - 21, 2 * (93 - 24)]


@pytest.mark.parametrize(
    ("window", "padded", "expected"),
    [
        ((-1, -1), False, [True, True]),  # no rule in its tiles: flash-attn 4 takes it (test_strided.py)
        ((1024, -1), False, [True, True]),  # a window wider than every segment cuts nothing
        ((300, -1), False, [False, False]),  # a window cutting tiles: FlexAttention reads it
        ((0, -1), False, [False, False]),  # cutting only the causal diagonal tiles (flash-attn's mask would not)
        ((-1, -1), True, [False, False]),  # padding: full tiles become partial per call
    ],
)
def test_flash_attn4_refuses_window_and_padding(window, padded, expected):
    calls = strided.strip_calls(
        torch.arange(1024), torch.arange(1024), num_heads=2, num_kv_heads=2, block_size=128, layout=None,
        branch_list=branches([512], [2], "lse", 2), causal=True, q=torch.zeros(1, 1024, 2, 64), dense=False,
        masks=False, tile=128, window=window, padded=padded,
    )  # fmt: skip
    assert [tile_grids(c) is not None for c in calls] == expected
    assert all(c.tiles.needs_window == (window in ((300, -1), (0, -1))) for c in calls)


# the ring: name -> (segments, rates, H, H_kv, pattern, causal, window, padding)
RING = {
    "window-causal-pad": ((32, 96), (1, 2), 4, 2, "none", True, (10, 0), True),
    "two-sided-layout": ((96,), (1,), 2, 1, "random-per-head", False, (6, 5), False),
}


def _ring_inputs(name: str):
    _, _, h, hkv, *_ = RING[name]
    generator = torch.Generator().manual_seed(len(name))
    q, dout = (torch.randn(2, 96, h, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, 96, hkv, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(2, 96, generator=generator) < 0.3
    mask[1, 40:56] = True
    return q, k, v, dout, mask


def _ring_rank(rank: int, world_size: int, layouts: list[str]) -> dict:
    results = {}
    for layout in layouts:
        for name, (segments, rates, _, _, pattern, causal, window, padding) in RING.items():
            *inputs, mask = _ring_inputs(name)
            local_mask = shard_sequence(mask, layout, rank=rank, world_size=world_size) if padding else None
            attn = _module(Case(name, 96, 1, segments, rates, window_size=window), pattern, layout=layout)
            results[layout, name] = run_shard(
                attn, tuple(inputs), rank, world_size, layout, is_causal=causal, key_padding_mask=local_mask
            )
    return results


@pytest.mark.distributed
@pytest.mark.parametrize(("world_size", "layouts"), [(2, ["contiguous", "zigzag"]), (3, ["contiguous"])])
def test_ring_with_windows_and_padding(world_size, layouts):
    """Windows crossing shards and padded keys (padding flags travel with the rows) on every ring step: exact;
    a (10, 0) causal window sends each rank's last two blocks (16 rows) to the next rank only."""
    by_rank = run_distributed(_ring_rank, world_size, layouts, timeout=300)
    for layout in layouts:
        for name, (segments, rates, h, _, pattern, causal, window, padding) in RING.items():
            q, k, v, dout, mask = _ring_inputs(name)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            pattern_name, options = PATTERNS[pattern]
            block_layout = None if pattern_name is None else build_pattern(pattern_name, **options).layout(96, 8, h)
            expected = reference_attention(
                *leaves, segment_lengths=segments, dilation_rates=rates, is_causal=causal, window_size=window,
                key_padding_mask=mask if padding else None, block_layout=block_layout, block_size=8,
            )  # fmt: skip
            grads = torch.autograd.grad(expected, leaves, dout)
            for rank, result in enumerate(by_rank):
                assert_rows_match(result[layout, name], expected, grads, rank, world_size, layout)
    row_bytes = 2 * 2 * (4 + 4) * 8 + 2  # batch 2, 2 kv heads, K and V of head dim 4, float64; padding flags
    for rank, result in enumerate(by_rank):
        sent = result["contiguous", "window-causal-pad"]["sent"]["forward"]
        assert sent == (16 * row_bytes if rank < world_size - 1 else 0)


@pytest.mark.parametrize("dense", [False, True], ids=["layout", "no-layout"])
@pytest.mark.parametrize("tile", [16, 32])
@pytest.mark.parametrize(("window", "causal"), [((70, 0), True), ((31, 50), False)])
def test_windows_and_padding_in_tiles_of_several_units(tile, window, causal, dense):
    """Kernel tiles larger than a layout block of the strip (the GPU case): window cuts and padded keys inside
    multi-unit tiles (full ones among them), forward and backward, exactly the reference."""
    n, h, block = 256, 4, 8
    segments, rates = [64, 128, 256], [1, 2, 4]
    layout = None if dense else build_pattern("random", density=0.5, seed=6, per_head=True).layout(n, block, h)
    generator = torch.Generator().manual_seed(tile)
    q, k, v, dout = (torch.randn(2, n, h, 5, generator=generator, dtype=torch.float64) for _ in range(4))
    mask = torch.zeros(2, n, dtype=torch.bool)  # a few padded keys, so that some full tiles stay full
    mask[0, 32:64] = True
    mask[1, [5, 130, 131, 200]] = True
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    calls = strided.strip_calls(
        torch.arange(n), torch.arange(n), num_heads=h, num_kv_heads=h, branch_list=branches(segments, rates, "lse", h),
        block_size=block, layout=layout, causal=causal, q=q, tile=tile, window=window, padded=True,
    )  # fmt: skip
    assert all(c.tiles.tile == tile and c.tiles.padded for c in calls) and any(c.tiles.needs_window for c in calls)
    assert dense <= any(
        cut_grids(c.tiles.full, c.tiles.partial, c.tiles.tile, mask[:, c.k.rows])[0].any() for c in calls
    )
    run = strided.StripRun(calls, dense_strip_kernel(q, causal, 5**-0.5, None), "math", key_padding_mask=mask)
    out, _ = strided.strip_attention(*leaves, run)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(
        *ref_leaves, segment_lengths=segments, dilation_rates=rates, is_causal=causal, block_layout=layout,
        block_size=block, window_size=window, key_padding_mask=mask,
    )  # fmt: skip
    expected_grads = torch.autograd.grad(expected, ref_leaves, dout)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
