"""Strips (one fused call per dilated branch offset, LSE-merged) vs the float64 reference, forward and backward.

On the CPU the fused kernel has no backward, so these run the strip path through its dense twin
(``sparse_kernel = "math"``: the same tiles and the same token rule as the fused kernel evaluates);
the eager FlexAttention forward is checked against the same reference, and the fused kernel on
the GPU in tests/blocksparse/test_cuda.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from tests.blocksparse.ring_helpers import assert_rows_match, ring_inputs, run_shard
from tests.distributed_helpers import raised, run_distributed

from ring_blocksparse import BlockSparseRingDilatedAttention, build_pattern
from ring_blocksparse.attention import dense_strip_kernel
from ring_blocksparse.strided import StripRun, strip_attention, strip_calls
from ring_blocksparse.strips import block_lists, classify, runs, strip_of
from ring_core import reference_attention
from ring_core.dilated import branches
from ring_core.sharding import shard_positions, shard_sequence
from ring_core.testing import Case, check_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

PATTERNS = {
    "random-per-head": ("random", {"density": 0.3, "seed": 2, "per_head": True}),
    "band": ("local_window", {"window": 20, "sliding": True}),
    "windows": ("local_window", {"window": 16}),
    "dilated-sparse": ("dilated_sparse", {"dilation": 3}),
    "global-local": ("global_local", {"global_tokens": 3, "window": 8}),
    "none": (None, {}),
}


def _module(config: dict, block: int, name: str, **extra) -> BlockSparseRingDilatedAttention:
    pattern, options = PATTERNS[name]
    attn = BlockSparseRingDilatedAttention(
        **config, block_size=block, pattern=pattern, method="flex", **options, **extra
    )
    attn.sparse_kernel = "math"
    return attn


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize(
    ("segments", "rates", "kv_heads", "merge"),
    [
        ((64,), (1,), 4, "lse"),
        ((12, 32, 64), (1, 2, 4), 2, "lse"),
        ((16, 64), (2, 4), 1, "head_groups"),
        ((16, 32, 64), (1, 2, 4), 2, "head_groups"),  # the rate-1 group: two query heads of one kv head
    ],
    ids=["dense", "dilated-gqa", "head-groups-mqa", "head-groups-gqa"],
)
def test_strips_match_reference(segments, rates, kv_heads, merge, name, causal):
    """Forward and backward, float64: patterns x branches (segments across blocks, rates 2 and 4, GQA)."""
    case = Case(f"{name}", 64, 4, segments, rates, kv_heads=kv_heads, merge=merge, causal=causal)
    attn = _module(case.config, 8, name)
    result = check_attention(
        attn, case, torch.float64, reference_options={"block_layout": attn.layout_for(64, 4), "block_size": 8}
    )
    assert attn.last_method == "flex"
    assert result.passed, f"{case}: {result.errors} > {result.tolerance}"


def test_the_dense_twin_computes_in_float32_as_the_kernel():
    """bf16 in, the twin's scores, softmax and lse in float32, as the fused kernel's: 2.1e-3 here (rounded to bf16,
    6.5e-3; in random draws up to 1.1e-2, where the other paths give 2e-3)."""
    case = Case("bf16", 64, 4, (12, 32, 64), (1, 2, 4), kv_heads=2, head_dim=64)
    attn = _module(case.config, 8, "band")
    result = check_attention(
        attn, case, torch.bfloat16, reference_options={"block_layout": attn.layout_for(64, 4), "block_size": 8}
    )
    assert result.errors["out"] <= 4e-3, result.errors


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("tile", [8, 16, 32])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiles_of_several_units(tile, causal, batch):
    """Kernel tiles larger than a layout block of the strip (the GPU case: 128 rows, blocks of 128/r): full
    tiles, partial tiles (the rule decides) and skipped ones still give exactly the reference; at batch 1 each
    branch's offsets run as one batched call (:mod:`ring_blocksparse.batches`), each reading its own layout."""
    n, h, block = 128, 4, 8
    segments, rates = [24, 64, 128], [1, 2, 4]
    layout = build_pattern("random", density=0.3, seed=5, per_head=True).layout(n, block, h)
    generator = torch.Generator().manual_seed(tile)
    q, k, v, dout = (torch.randn(batch, n, h, 8, generator=generator, dtype=torch.float64) for _ in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    calls = strip_calls(
        torch.arange(n), torch.arange(n), num_heads=h, num_kv_heads=h, branch_list=branches(segments, rates, "lse", h),
        block_size=block, layout=layout, causal=causal, q=q, tile=tile,
    )  # fmt: skip
    assert any(c.tiles.partial.any() for c in calls) and all(c.tiles.tile == tile for c in calls)
    run = StripRun(calls, dense_strip_kernel(q, causal, 8**-0.5, None), "math")
    out, _ = strip_attention(*leaves, run)
    assert len(run.units) == (3 if batch == 1 else len(calls))
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(
        *ref_leaves, segment_lengths=segments, dilation_rates=rates, is_causal=causal, block_layout=layout,
        block_size=block,
    )  # fmt: skip
    expected_grads = torch.autograd.grad(expected, ref_leaves, dout)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_tile_classes_are_exact():
    """Brute force: a full tile has every pair allowed, a skipped tile none, for layout x segments x causality."""
    n, block, rate, tile = 96, 8, 2, 8
    layout = build_pattern("random", density=0.4, seed=3).layout(n, block)
    strip = strip_of(torch.arange(n), 1, rate)
    pos = strip.positions
    for segment, causal in ((20, True), (48, False), (96, True)):
        tiles = classify(strip, strip, layout, block_size=block, segment=segment, causal=causal, tile=tile)
        allowed = layout[0][pos[:, None] // block, pos[None, :] // block] & (pos[:, None] // segment == pos // segment)
        if causal:
            allowed &= pos[None, :] <= pos[:, None]
        per_tile = allowed.unflatten(0, (-1, tile)).unflatten(2, (-1, tile))
        assert torch.equal(tiles.full[0], per_tile.all(3).all(1))
        assert torch.equal(tiles.full[0] | tiles.partial[0], per_tile.any(3).any(1))


def test_block_lists_of_a_transposed_grid():
    """Counts and ascending indices per row, contiguous even for a transposed grid (the backward's lists:
    flash-attn 4 rejects strided block lists)."""
    grid = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    for mask in (grid, grid.transpose(1, 2)):
        counts, indices = block_lists(mask, "cpu")
        assert counts.is_contiguous() and indices.is_contiguous()
        assert torch.equal(counts[0], mask.sum(-1, dtype=torch.int32))
        for h, row in itertools.product(range(mask.shape[0]), range(mask.shape[1])):
            expected = mask[h, row].nonzero().flatten().to(torch.int32)
            assert torch.equal(indices[0, h, row, : counts[0, h, row]], expected)


@pytest.mark.parametrize(
    ("pattern", "options", "segments", "rates", "expected"),
    [
        (None, {}, [16, 64], [1, 2], [16, 32, 32]),  # plain dilated: segments of w / r rows
        ("local_window", {"window": 16}, [64], [1], [16]),  # windows are segments
        ("local_window", {"window": 16}, [8, 64], [1, 2], [8, 8, 8]),  # the shorter of window and segment
        ("local_window", {"window": 16, "sliding": True}, [64], [1], [None]),  # a band is not
        ("dilated_sparse", {"dilation": 2}, [64], [1], [None]),  # cliques, but not consecutive runs
    ],
)
def test_dense_strips_are_found(pattern, options, segments, rates, expected):
    """A strip whose allowed pairs are exactly "same run" goes to the registry's dense kernel, others to the
    fused block-sparse kernel; both ways are exact (test_strips_match_reference)."""
    layout = None if pattern is None else build_pattern(pattern, **options).layout(64, 8)
    q = torch.zeros(1, 64, 2, 4)
    calls = strip_calls(
        torch.arange(64), torch.arange(64), num_heads=2, num_kv_heads=2, branch_list=branches(segments, rates, "lse", 2),
        block_size=8, layout=layout, causal=True, q=q,
    )  # fmt: skip
    assert [c.run for c in calls] == expected
    strip = strip_of(torch.arange(64), 0, 1)
    tiles = classify(strip, strip, None, block_size=8, segment=12, causal=False, tile=8)
    assert runs(tiles, strip, strip, False) is None  # segments across units: not a dense strip


@pytest.mark.parametrize("causal", [False, True])
def test_a_lower_triangular_layout_is_dense_only_in_a_causal_call(causal):
    """Blocks allowed on and below the diagonal: a causal call computes them as one causal dense run, a call that
    is not causal may not (its dense kernel would read the blocks above the diagonal); both exact."""
    n, block = 16, 4
    layout = torch.ones(n // block, n // block, dtype=torch.bool).tril()[None]
    attn = BlockSparseRingDilatedAttention([n], [1], block_size=block, block_layout=layout, method="flex")
    attn.sparse_kernel = "math"
    case = Case("lower-triangular", n, 2, (n,), (1,), causal=causal)
    result = check_attention(attn, case, torch.float64, reference_options={"block_layout": layout, "block_size": block})
    assert [c.run for c in attn.last_plan.calls[0]] == ([n] if causal else [None])
    assert result.passed, result.errors


def test_eager_flex_forward_on_strips():
    """The eager FlexAttention kernel on the same strips (block masks, rules, LSE merges) as the GPU runs."""
    case = Case("eager", 64, 4, (12, 32, 64), (1, 2, 4), kv_heads=2, causal=True)
    attn = _module(case.config, 8, "random-per-head")
    attn.sparse_kernel = "flex"
    generator = torch.Generator().manual_seed(9)
    q = torch.randn(2, 64, 4, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 64, 2, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        out = attn(q, k, v, is_causal=True)
    expected = reference_attention(
        q, k, v, **case.config, is_causal=True, block_layout=attn.layout_for(64, 4), block_size=8
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


# the sparse ring on strips: name -> (segments, rates, H, H_kv, block, pattern, causal)
RING = {
    "random-dilated-gqa": ((16, 32, 64), (1, 2, 4), 4, 2, 8, "random-per-head", True),
    "band": ((128,), (1,), 2, 2, 8, "band", False),
    "windows-in-shards": ((32, 64), (1, 2), 2, 2, 8, "windows", True),
}


def _ring_inputs(name: str):
    _, _, h, hkv, *_ = RING[name]
    return ring_inputs(len(name), 2, 128, h, hkv)


def _ring_rank(rank: int, world_size: int, layouts: list[str]) -> dict:
    results = {}
    for layout in layouts:
        for name, (segments, rates, _, _, block, pattern, causal) in RING.items():
            attn = _module({"segment_lengths": segments, "dilation_rates": rates}, block, pattern, layout=layout)
            results[layout, name] = run_shard(attn, _ring_inputs(name), rank, world_size, layout, is_causal=causal)
    return results


@pytest.mark.distributed
@pytest.mark.parametrize(("world_size", "layouts"), [(2, ["contiguous", "zigzag"]), (4, ["contiguous"])])
def test_ring_on_strips(world_size, layouts):
    """Each ring step on the strip kernels (the received rows put back into the source's shard): exact on both
    layouts; windows inside the shards send nothing, a band only its boundary rows."""
    by_rank = run_distributed(_ring_rank, world_size, layouts, timeout=300)
    for layout in layouts:
        for name, (segments, rates, h, _, block, pattern, causal) in RING.items():
            q, k, v, dout = _ring_inputs(name)
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            pattern_name, options = PATTERNS[pattern]
            expected = reference_attention(
                *leaves, segment_lengths=segments, dilation_rates=rates, is_causal=causal,
                block_layout=build_pattern(pattern_name, **options).layout(128, block, h), block_size=block,
            )  # fmt: skip
            grads = torch.autograd.grad(expected, leaves, dout)
            for rank, result in enumerate(by_rank):
                assert_rows_match(result[layout, name], expected, grads, rank, world_size, layout)
    for result in by_rank:
        if world_size == 2:
            assert sum(result["contiguous", "windows-in-shards"]["sent"].values()) == 0
        # a band of two blocks either side: the 16 rows nearest each shard boundary cross it, K and V, each way
        boundaries = 1 if result is by_rank[0] or result is by_rank[-1] else 2
        row_bytes = 2 * 2 * (4 + 4) * 8  # batch 2, 2 kv heads, K and V of head dim 4, float64
        assert result["contiguous", "band"]["sent"]["forward"] == boundaries * 16 * row_bytes


def _ring_lse_rank(rank: int, world_size: int, layouts: list[str]) -> dict:
    results = {}
    for layout in layouts:
        for name in ("random-dilated-gqa", "band"):
            segments, rates, _, _, block, pattern, causal = RING[name]
            q, k, v, dout = _ring_inputs(name)
            d_lse = torch.randn(2, q.shape[2], 128, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
            local = [
                shard_sequence(x, layout, rank=rank, world_size=world_size).clone().requires_grad_() for x in (q, k, v)
            ]
            attn = _module({"segment_lengths": segments, "dilation_rates": rates}, block, pattern, layout=layout)
            out, lse = attn(*local, is_causal=causal, return_lse=True)
            rows = shard_positions(128, rank, world_size, layout)
            loss = (out * shard_sequence(dout, layout, rank=rank, world_size=world_size)).sum()
            loss = loss + torch.where(torch.isfinite(lse), lse * d_lse[:, :, rows], 0).sum()
            loss.backward()
            results[layout, name] = {
                "out": out.detach().numpy(), "lse": lse.detach().numpy(), "grads": [x.grad.numpy() for x in local],
                "method": attn.last_method,
            }  # fmt: skip
    disagree = _module({"segment_lengths": (128,), "dilation_rates": (1,)}, 8, "band")
    local = [shard_sequence(x, "contiguous", rank=rank, world_size=world_size) for x in _ring_inputs("band")[:3]]
    results["disagree"] = raised(lambda: disagree(*local, return_lse=rank == 0))
    return results


@pytest.mark.distributed
def test_ring_on_strips_returns_lse_with_its_gradient():
    """``return_lse=True`` on the sparse ring runs on the strips; the lse's gradient (one more backward pass of the
    ring) is exact on both layouts. Ranks that disagree on ``return_lse`` raise the same error, none hangs."""
    world_size, layouts = 2, ["contiguous", "zigzag"]
    by_rank = run_distributed(_ring_lse_rank, world_size, layouts, timeout=300)
    for layout in layouts:
        for name in ("random-dilated-gqa", "band"):
            segments, rates, h, _, block, pattern, causal = RING[name]
            q, k, v, dout = _ring_inputs(name)
            d_lse = torch.randn(2, h, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            pattern_name, options = PATTERNS[pattern]
            out, lse = reference_attention(
                *leaves, segment_lengths=segments, dilation_rates=rates, is_causal=causal, return_lse=True,
                block_layout=build_pattern(pattern_name, **options).layout(128, block, h), block_size=block,
            )  # fmt: skip
            ((out * dout).sum() + torch.where(torch.isfinite(lse), lse * d_lse, 0).sum()).backward()
            for rank, result in enumerate(by_rank):
                got = result[layout, name]
                assert got["method"] == "flex"
                rows = shard_positions(128, rank, world_size, layout)
                torch.testing.assert_close(torch.from_numpy(got["out"]), out.detach()[:, rows], rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(
                    torch.from_numpy(got["lse"]), lse.detach()[:, :, rows], rtol=1e-10, atol=1e-12
                )
                for grad, leaf in zip(got["grads"], leaves):
                    torch.testing.assert_close(torch.from_numpy(grad), leaf.grad[:, rows], rtol=1e-9, atol=1e-11)
    errors = [result["disagree"] for result in by_rank]
    assert errors[0] is not None and all(e == errors[0] for e in errors), errors


@pytest.mark.parametrize(
    ("pattern", "options", "segments", "rates", "causal", "expected"),
    [
        ("random", {"density": 0.3, "seed": 1}, [512], [1], False, [True]),  # tiles are blocks: all full
        ("random", {"density": 0.3, "seed": 1}, [512], [1], True, [True]),  # + causal diagonal tiles
        ("local_window", {"window": 256, "sliding": True}, [192], [1], False, [False]),  # segments cut tiles
        ("random", {"density": 0.5, "seed": 3}, [512], [2], False, [False, False]),  # a tile spans two blocks
        (None, {}, [512], [2], True, [True, True]),  # plain dilated, causal: diagonal tiles only
    ],
)
def test_flash_attn4_takes_calls_whose_tiles_need_no_rule(pattern, options, segments, rates, causal, expected):
    """flash-attn 4 gets a strip call only when its full tiles, plus causal diagonal tiles of a strip against
    itself, are everything it allows; the block lists are those tiles (its backward's, transposed)."""
    from ring_blocksparse.fa4 import tile_grids

    layout = None if pattern is None else build_pattern(pattern, **options).layout(1024, 128)
    q = torch.zeros(1, 1024, 2, 64)
    calls = strip_calls(
        torch.arange(1024), torch.arange(1024), num_heads=2, num_kv_heads=2, block_size=128, layout=layout,
        branch_list=branches(segments, rates, "lse", 2), causal=causal, q=q, dense=False, masks=False, tile=128,
    )  # fmt: skip
    grids = [tile_grids(c) for c in calls]
    assert [g is not None for g in grids] == expected
    for call, grid in zip(calls, grids):
        if grid is not None:
            full, diagonal = grid
            assert torch.equal(full | diagonal, call.tiles.full | call.tiles.partial)
            assert not (diagonal & ~torch.eye(diagonal.shape[1], dtype=torch.bool)).any()
            assert causal or not diagonal.any()


@pytest.mark.parametrize(
    ("name", "segments", "rates", "kv_heads", "merge", "causal"),
    [
        ("random-per-head", (12, 32, 64), (1, 2, 4), 2, "lse", True),
        ("none", (16, 64), (2, 4), 1, "head_groups", False),
        ("band", (64,), (1,), 4, "lse", False),
    ],
    ids=["dilated-causal-gqa", "head-groups-dense-calls", "band"],
)
def test_return_lse_runs_on_the_strips_with_its_gradient(name, segments, rates, kv_heads, merge, causal):
    """``return_lse=True`` on one process takes the strips, and the lse's gradient reaches q and k exactly (sparse
    calls through their lse, dense calls through one more backward pass): float64 vs the reference."""
    n, h, d = 64, 4, 8
    attn = _module({"segment_lengths": segments, "dilation_rates": rates, "merge": merge}, 8, name)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, n, h, d, dtype=torch.float64, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, n, kv_heads, d, dtype=torch.float64, generator=gen, requires_grad=True) for _ in "kv")
    d_out = torch.randn(2, n, h, d, dtype=torch.float64, generator=gen)
    d_lse = torch.randn(2, h, n, dtype=torch.float64, generator=gen)

    def loss(out, lse):
        return (out * d_out).sum() + torch.where(torch.isfinite(lse), lse * d_lse, 0).sum()

    out, lse = attn(q, k, v, is_causal=causal, return_lse=True)
    assert attn.last_method == "flex"
    grads = torch.autograd.grad(loss(out, lse), (q, k, v))
    ref_out, ref_lse = reference_attention(
        q, k, v, segment_lengths=segments, dilation_rates=rates, merge=merge, is_causal=causal, return_lse=True,
        block_layout=attn.layout_for(n, h), block_size=8,
    )  # fmt: skip
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), (q, k, v))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype), atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    without_lse = torch.autograd.grad((reference_attention(
        q, k, v, segment_lengths=segments, dilation_rates=rates, merge=merge, is_causal=causal,
        block_layout=attn.layout_for(n, h), block_size=8,
    ) * d_out).sum(), q)[0]  # fmt: skip
    assert not torch.allclose(without_lse, ref_grads[0])  # the lse's gradient is part of what is checked


@pytest.mark.parametrize("batch", [1, 2])
def test_strips_without_graphs_run_flex_backward_kernel(batch, backward_operator):
    """A run on FlexAttention keeps no graph: its backward calls FlexAttention's backward operator on the final out
    and lse (here its dense form: the CPU's FlexAttention has no autograd backward), the lse's gradient included:
    float64 vs the reference, per-head layout, causal, GQA, batched calls at batch 1."""
    n, h, block, segments, rates = 64, 4, 8, [16, 32, 64], [1, 2, 4]
    layout = build_pattern("random", density=0.4, seed=9, per_head=True).layout(n, block, h)
    generator = torch.Generator().manual_seed(batch)
    q, dout = (torch.randn(batch, n, h, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(batch, n, 2, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    dlse = torch.randn(batch, n, h, generator=generator, dtype=torch.float64)
    calls = strip_calls(
        torch.arange(n), torch.arange(n), num_heads=h, num_kv_heads=2, branch_list=branches(segments, rates, "lse", h),
        block_size=block, layout=layout, causal=True, q=q,
    )  # fmt: skip
    run = StripRun(calls, dense_strip_kernel(q, True, 8**-0.5, None), "flex", lse_grad=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = strip_attention(*leaves, run)
    assert all(saved is None for saved in run.saved) and (batch > 1 or len(run.units) < len(calls))
    grads = torch.autograd.grad((out, lse), leaves, (dout, torch.where(torch.isfinite(lse), dlse, 0)))
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_attention(
        *ref_leaves, segment_lengths=segments, dilation_rates=rates, is_causal=True, block_layout=layout,
        block_size=block, return_lse=True,
    )  # fmt: skip
    ref_lse = ref_lse.transpose(1, 2)
    ref_grads = torch.autograd.grad(
        (ref_out, ref_lse), ref_leaves, (dout, torch.where(torch.isfinite(ref_lse), dlse, 0))
    )
    torch.testing.assert_close(out, ref_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_checkpointed_strips_keep_no_graph(monkeypatch):
    """Under activation checkpointing (saved-tensor hooks) the forward keeps no FlexAttention graph, which would hold
    what the checkpoint frees; the backward recomputes each call: the same gradients as without."""
    from torch.utils.checkpoint import checkpoint

    import ring_blocksparse.strided as strided

    kept = []
    original = strided.sparse_forward

    def spy(*args, **kwargs):
        kept.append(kwargs["grad"])
        return original(*args, **kwargs)

    monkeypatch.setattr(strided, "sparse_forward", spy)
    attn = _module({"segment_lengths": (16, 32, 64), "dilation_rates": (1, 2, 4)}, 8, "random-per-head")
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 64, 4, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    results = []
    for wrap in (
        lambda *x: attn(*x, is_causal=True),
        lambda *x: checkpoint(attn, *x, is_causal=True, use_reentrant=False),
    ):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        kept.clear()
        out = wrap(*leaves)
        forward = list(kept)
        out.backward(torch.ones_like(out))
        results.append((forward, out, [x.grad for x in leaves]))
    (plain, out, grads), (hooked, checked_out, checked_grads) = results
    assert plain and all(plain) and hooked and not any(hooked)
    torch.testing.assert_close(checked_out, out, rtol=1e-12, atol=1e-12)
    for a, b in zip(checked_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("pattern", "options", "expected"),
    [
        ("random", {"density": 0.1, "seed": 0}, {1: 128, 2: 64, 4: 32}),
        ("dilated_sparse", {"dilation": 10}, {1: 128, 2: 64, 4: 32}),
        ("local_window", {"window": 1664, "sliding": True}, {1: 128, 2: 128, 4: 128}),
        ("global_local", {"global_tokens": 1024, "window": 2304}, {1: 128, 2: 128, 4: 128}),
    ],
    ids=["random", "dilated-sparse", "band", "global-local"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cuda_strips_take_block_tiles_where_they_visit_much_less(monkeypatch, pattern, options, expected, causal):
    """On CUDA a strip of rate r is tiled at 128 rows (r layout blocks a side: kept when any of r x r blocks is) or,
    where that visits at least twice the pairs, at one layout block (128 / r rows): a scattered layout's rates 2 and 4
    take block tiles, all full or empty; a band or windows keep 128 rows (and flash-attn 4). The caller's
    ``flex_kernel_options`` tiles keep 128 rows. (The CUDA device is simulated: only the tile choice reads it.)"""
    from ring_blocksparse import flex, strided

    monkeypatch.setattr(strided, "tile_for", lambda device, block_size, rate: flex.FLEX_TILE)
    monkeypatch.setattr(strided, "block_tile", lambda _, *args: flex.block_tile(torch.device("cuda"), *args))
    n, h, block = 16384, 2, 128
    layout = build_pattern(pattern, **options).layout(n, block)

    def calls(**extra):
        return strip_calls(
            torch.arange(n), torch.arange(n), num_heads=h, num_kv_heads=h, block_size=block, layout=layout,
            branch_list=branches([2048, 4096, 8192], [1, 2, 4], "lse", h), causal=causal, q=torch.zeros(1, n, h, 8),
            masks=False, **extra,
        )  # fmt: skip

    chosen = calls()
    assert {c.q.rate: c.tiles.tile for c in chosen} == expected
    for call in chosen:
        if call.tiles.tile < flex.FLEX_TILE:  # every tile one layout block: no rule reads the layout
            assert not call.tiles.needs_layout
    assert {c.tiles.tile for c in calls(kernel_options={"bwd_BLOCK_M1": 64})} == {flex.FLEX_TILE}
    monkeypatch.setenv(flex.BLOCK_TILES_ENV, "0")  # (A/B timing)
    assert {c.tiles.tile for c in calls()} == {flex.FLEX_TILE}
