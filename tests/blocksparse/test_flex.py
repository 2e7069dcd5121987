"""The FlexAttention path (strips, one process): exact vs the reference, and when it applies.

On the CPU FlexAttention runs eagerly and has no backward, so these check forward only;
tests/blocksparse/test_strided.py checks the strips forward and backward through the kernel's dense
twin, and tests/blocksparse/test_cuda.py forward and backward of the fused kernel.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention, build_pattern
from ring_core import reference_attention

pytest.importorskip("torch.nn.attention.flex_attention")
# eager FlexAttention (CPU) warns that it is unfused: expected here
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.mark.parametrize(
    ("n", "heads", "kv_heads", "segment", "causal", "pattern", "options"),
    [
        (64, 4, 4, 64, False, "random", {"density": 0.3, "per_head": True}),
        (64, 4, 4, 64, True, "local_window", {"window": 16}),
        (64, 4, 2, 32, True, "random", {"density": 0.5}),  # segments of whole blocks, GQA
        (48, 2, 2, 64, True, "strided", {"stride": 16}),  # a segment longer than N
        (64, 2, 2, 64, True, None, {}),  # no layout: dense causal
        (64, 4, 2, (12, 32), True, "random", {"density": 0.4, "per_head": True}),  # dilated, segments across blocks
        (64, 4, 4, (16, 64), False, "local_window", {"window": 20, "sliding": True}),
    ],
)
def test_flex_forward_matches_reference(n, heads, kv_heads, segment, causal, pattern, options):
    segments = list(segment) if isinstance(segment, tuple) else [segment]
    rates = [1, 2][: len(segments)]
    attn = BlockSparseRingDilatedAttention(segments, rates, block_size=8, pattern=pattern, method="flex", **options)
    generator = torch.Generator().manual_seed(n + heads)
    q = torch.randn(2, n, heads, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, n, kv_heads, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        out = attn(q, k, v, is_causal=causal)
    assert attn.last_method == "flex"
    layout = attn.layout_for(n, heads)
    expected = reference_attention(
        q, k, v, segment_lengths=segments, dilation_rates=rates, is_causal=causal, block_layout=layout,
        block_size=None if layout is None else 8,
    )  # fmt: skip
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_flex_rows_with_no_allowed_key_give_zero():
    layout = torch.ones(1, 4, 4, dtype=torch.bool)
    layout[0, 2] = False
    attn = BlockSparseRingDilatedAttention([32], [1], block_size=8, block_layout=layout, method="flex")
    q = torch.randn(1, 32, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        out = attn(q, q, q)
    assert torch.isfinite(out).all() and out[:, 16:24].abs().max() == 0


@pytest.mark.parametrize(
    ("config", "call", "match"),
    [
        ({"segment_lengths": [8, 24], "dilation_rates": [1, 3]}, {}, "dilation rate 3 does not divide block_size 8"),
        ({"segment_lengths": [32], "dilation_rates": [1]}, {"grad": True}, "FlexAttention has no backward on cpu"),
    ],
)
def test_flex_says_why_it_cannot_run(monkeypatch, config, call, match):
    # (the CPU's FlexAttention has no autograd backward; the backward operator alone, which runs there, switched off)
    from ring_blocksparse.flex_backward import FLEX_BACKWARD_ENV

    monkeypatch.setenv(FLEX_BACKWARD_ENV, "0")
    attn = BlockSparseRingDilatedAttention(**config, block_size=8, method="flex")
    n = call.get("n", 32)
    q = torch.randn(1, n, 2, 4, requires_grad=call.get("grad", False))
    with pytest.raises(ValueError, match=f"method='flex' cannot run this call: .*{match}"):
        attn(q, q, q)


def test_a_ring_chunk_of_partial_tiles_is_a_reason():
    """One process pads N to whole tiles (tests/blocksparse/test_strip_lengths.py); a ring's shards cannot be."""
    from ring_blocksparse.flex import flex_reasons

    q = torch.zeros(1, 36, 2, 4)
    options = {"dilation_rates": [1, 2], "block_size": 8, "dropout_p": 0.0}
    assert flex_reasons(q, world_size=2, chunk=36, **options) == [
        "each shard's chunk (36 rows) is not a multiple of rate 1 x tile 8",
        "each shard's chunk (36 rows) is not a multiple of rate 2 x tile 4",
    ]
    assert flex_reasons(q, world_size=2, chunk=32, **options) == []


def _twice(x):
    return x * 2


@pytest.mark.parametrize("limit", [1, 8])
def test_compiled_kernels_keep_compiling_past_dynamos_recompile_limit(monkeypatch, limit):
    """Each strip shape and rule variant is one more graph of the same compiled FlexAttention call; past dynamo's
    recompile limit dynamo would raise (the calls compile whole), so the calls lift the limit, and leave the
    caller's as it was."""
    from ring_blocksparse import flex

    compiled = []

    def backend(graph, inputs):
        compiled.append(tuple(inputs[0].shape))
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **options: compile_(fn, **dict(options, backend=backend, options=None))
    )
    monkeypatch.setattr(flex, "_COMPILED", {})
    torch._dynamo.reset()
    twice = flex.compiled_flex("test", _twice, 128)
    with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=limit):
        for n in range(1, 11):
            assert torch.equal(twice(torch.ones(n)), torch.full((n,), 2.0))
        assert (torch._dynamo.config.recompile_limit, torch._dynamo.config.accumulated_recompile_limit) == (
            limit,
            limit,
        )
    assert compiled == [(n,) for n in range(1, 11)]
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("switch", "match"),
    [
        ("TORCHDYNAMO_DISABLE", r"torch.compile is disabled"),
        ("TORCH_COMPILE_DISABLE", r"torch.compile is disabled"),
        ("force_eager", r"set_stance\('force_eager'\)"),
        ("eager_on_recompile", r"set_stance\('eager_on_recompile'\)"),
    ],
)
def test_no_strips_on_cuda_where_torch_compile_would_not_compile(monkeypatch, switch, match):
    """FlexAttention unfused obeys only the mask_mod, and on CUDA the strips' rules leave the layout to the block
    mask: where dynamo would not compile (disabled, or an eager stance), the strips are not a CUDA call's path (a
    reason of ``flex_reasons``: ``"auto"`` takes the gather path, ``method="flex"`` raises before any work), and a
    compiled call made anyway raises instead of running unfused."""
    from ring_blocksparse import flex

    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    options = {"world_size": 1, "chunk": 256, "dilation_rates": [1], "block_size": 128, "dropout_p": 0.0}
    with contextlib.ExitStack() as switched:
        if switch == "TORCHDYNAMO_DISABLE":
            monkeypatch.setenv(switch, "1")
        elif switch == "TORCH_COMPILE_DISABLE":  # (read by torch._dynamo.config at import)
            switched.enter_context(torch._dynamo.config.patch(disable=True))
        else:
            switched.enter_context(torch.compiler.set_stance(switch))
        reasons = flex.flex_reasons(cuda, **options)
        assert len(reasons) == 1 and re.search(match, reasons[0]), reasons
        assert flex.flex_reasons(torch.zeros(1, 256, 2, 4), **options) == []  # (the CPU's rules read the layout)
        with pytest.raises(RuntimeError, match=f"need its compiled kernels on CUDA: .*{match}"):
            flex.compiled_flex("test", _twice, 128)
        monkeypatch.undo()
    assert flex.flex_reasons(cuda, **options) == []


def test_block_tiles_keep_autograds_backward_on_cuda(monkeypatch):
    """The backward operator takes every FlexAttention call, except on CUDA one of block tiles (under 128 rows)."""
    from types import SimpleNamespace

    from ring_blocksparse import flex_backward

    monkeypatch.delenv(flex_backward.FLEX_BACKWARD_ENV, raising=False)
    monkeypatch.setattr(flex_backward, "_TORCH", (2, 11))
    cpu, cuda = SimpleNamespace(is_cuda=False), SimpleNamespace(is_cuda=True)
    fine, coarse = (SimpleNamespace(tiles=SimpleNamespace(tile=tile)) for tile in (32, 128))
    assert flex_backward.takes(fine, cpu) and flex_backward.takes(coarse, cuda)
    assert not flex_backward.takes(fine, cuda)
    monkeypatch.setenv(flex_backward.FLEX_BACKWARD_ENV, "0")
    assert not flex_backward.takes(coarse, cuda) and not flex_backward.takes(coarse, cpu)
    monkeypatch.delenv(flex_backward.FLEX_BACKWARD_ENV)
    monkeypatch.setattr(flex_backward, "_TORCH", (2, 10))
    assert not flex_backward.takes(coarse, cpu)


def test_auto_uses_gather_on_cpu():
    attn = BlockSparseRingDilatedAttention([32], [1], block_size=8, pattern="local_window", window=16)
    q = torch.randn(1, 32, 2, 4, dtype=torch.float64)
    attn(q, q, q)
    assert attn.last_method == "gather"
    with pytest.raises(ValueError, match="method must be one of"):
        BlockSparseRingDilatedAttention([32], [1], block_size=8, method="fast")
    assert build_pattern("local_window", window=16).density(32, 8) == 0.5


def test_auto_falls_back_to_gather_when_flex_fails(monkeypatch):
    """'auto' warns once and computes the same result through the gather path; 'flex' raises."""
    import ring_blocksparse.attention as attention
    import ring_blocksparse.flex as flex

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(flex, "flex_strip_attention", broken)
    monkeypatch.setattr(attention.BlockSparseRingDilatedAttention, "_use_flex", lambda self, *a: not self._flex_failed)
    attn = BlockSparseRingDilatedAttention([32], [1], block_size=8, pattern="local_window", window=16, sliding=True)
    q = torch.randn(1, 32, 2, 4, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="FlexAttention failed .*no kernel for this GPU.*gather path"):
        out = attn(q, q, q)
    assert attn.last_method == "gather"
    expected = reference_attention(
        q, q, q, segment_lengths=[32], dilation_rates=[1], block_layout=attn.layout_for(32, 2), block_size=8
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attn(q, q, q)  # no second warning: flex is not tried again
    forced = BlockSparseRingDilatedAttention([32], [1], block_size=8, pattern="random", density=0.5, method="flex")
    with pytest.raises(RuntimeError, match="no kernel for this GPU"):
        forced(q, q, q)


def _flags(layout: torch.Tensor, causal: bool) -> dict:
    from ring_blocksparse.flex import StripRule, strip_block_mask
    from ring_blocksparse.strips import classify, strip_of

    strip = strip_of(torch.arange(layout.shape[-1] * 8), 0, 1)
    tiles = classify(strip, strip, layout, block_size=8, segment=1 << 20, causal=causal, tile=8)
    rule = StripRule(strip, strip, layout, block_size=8, segment=1 << 20, causal=causal, device="cpu")
    return strip_block_mask(tiles, rule, len(strip), len(strip), torch.device("cpu"))[1]


def test_safe_flags_follow_the_layout():
    """ROWS_GUARANTEED_SAFE only when every query row has a key; BLOCKS_ARE_CONTIGUOUS only for one run per
    row and per column (a band), causal or not."""
    i = torch.arange(8)
    band = ((i[:, None] - i[None, :]).abs() <= 1)[None]
    assert _flags(band, False) == {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}
    assert _flags(band, True) == {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True}
    random = build_pattern("random", density=0.4, seed=0).layout(64, 8)
    assert _flags(random, False) == {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": False}
    empty_row = band.clone()
    empty_row[0, 3] = False
    assert _flags(empty_row, False)["ROWS_GUARANTEED_SAFE"] is False
    # causal: a row whose only blocks lie above the diagonal sees nothing
    upper = torch.zeros(1, 8, 8, dtype=torch.bool)
    upper[0, :, 7] = True
    assert _flags(upper, False)["ROWS_GUARANTEED_SAFE"] is True
    assert _flags(upper, True)["ROWS_GUARANTEED_SAFE"] is False
    gap = band.clone()
    gap[0, 0, 5] = True  # row 0: blocks 0, 1 and 5: two runs
    assert _flags(gap, False)["BLOCKS_ARE_CONTIGUOUS"] is False


def test_rows_are_safe_only_with_a_key_in_the_first_tile_visited():
    """FlexAttention visits a row's partial tiles first (ascending), then its full ones, and with
    ROWS_GUARANTEED_SAFE a row with no key in the first tile it visits turns NaN: the flag needs
    every row of tiles to start at a tile that holds a key for each of its rows."""
    from ring_blocksparse.flex import safe_flags

    eye = torch.eye(4, dtype=torch.bool)[None]
    full = torch.tril(torch.ones(4, 4, dtype=torch.bool), -1)[None]
    assert safe_flags(full, eye, diagonal_only=True)["ROWS_GUARANTEED_SAFE"] is True  # causal: the diagonal
    # a causal window: each row's far edge tile (partial, visited first) before its full and diagonal tiles
    edge = torch.zeros(1, 4, 4, dtype=torch.bool)
    edge[0, 2, 0] = edge[0, 3, 1] = True
    band_full = full & ~edge & (torch.arange(4)[:, None] - torch.arange(4)[None, :] <= 2)
    assert safe_flags(band_full, eye | edge, diagonal_only=True)["ROWS_GUARANTEED_SAFE"] is False
    assert safe_flags(band_full, eye, diagonal_only=True)["ROWS_GUARANTEED_SAFE"] is True
    # a layout's partial tile in a row that also has full tiles: some of its rows may have no key there
    layout_partial = torch.zeros(1, 4, 4, dtype=torch.bool)
    layout_partial[0, 1, 3] = True
    assert (
        safe_flags(torch.ones(1, 4, 4, dtype=torch.bool) & ~layout_partial, layout_partial)["ROWS_GUARANTEED_SAFE"]
        is False
    )
    assert (
        safe_flags(torch.ones(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool))[
            "ROWS_GUARANTEED_SAFE"
        ]
        is True
    )


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ([("BLOCK_M", 64)], TypeError, "kernel_options must be a dict"),
        (
            {"fwd_BLOCK_M": 48},
            ValueError,
            r"kernel_options\['fwd_BLOCK_M'\] must be a power of two dividing 128, got 48",
        ),
        ({"num_warps": 0}, ValueError, r"kernel_options\['num_warps'\] must be a positive int, got 0"),
        ({"bwd_num_stages": 2.0}, ValueError, r"kernel_options\['bwd_num_stages'\] must be a positive int"),
        ({"USE_TMA": 1}, ValueError, r"kernel_options\['USE_TMA'\] must be a bool, got 1"),
        # a misspelt option would go to the kernel unread
        (
            {"fwd_BLOCKM": 64},
            ValueError,
            r"kernel_options\['fwd_BLOCKM'\] is not a FlexAttention kernel option.*BLOCK_M",
        ),
    ],
)
def test_flex_kernel_options_are_validated(options, error, match):
    with pytest.raises(error, match=match):
        BlockSparseRingDilatedAttention([32], [1], block_size=8, flex_kernel_options=options)


def test_flex_kernel_options_are_only_passed_on_cuda():
    from ring_blocksparse.flex import kernel_options_for

    attn = BlockSparseRingDilatedAttention(
        [32], [1], block_size=8, pattern="local_window", window=16, method="flex",
        flex_kernel_options={"fwd_num_stages": 2, "PRESCALE_QK": False},
    )  # fmt: skip
    assert attn.flex_kernel_options == {"fwd_num_stages": 2, "PRESCALE_QK": False}
    q = torch.randn(1, 32, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        attn(q, q, q)
    assert attn.last_method == "flex"
    assert kernel_options_for(q, {"ROWS_GUARANTEED_SAFE": True}, {"num_warps": 4}) is None


def test_tuned_tiles_only_where_the_rule_reads_no_layout(monkeypatch):
    """Rules that read the layout inside partial tiles keep FlexAttention's own forward tiles (the tuned ones need
    more shared memory than a Hopper SM has there); user options still go on top."""
    from ring_blocksparse import flex

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(1, 8, 2, 128))  # an H200's query
    tuned = flex.kernel_options_for(q, {"ROWS_GUARANTEED_SAFE": True}, None)
    plain = flex.kernel_options_for(q, {"ROWS_GUARANTEED_SAFE": True}, {"fwd_num_stages": 2}, tuned=False)
    assert tuned == {"ROWS_GUARANTEED_SAFE": True, **flex.TUNED_OPTIONS[9, torch.bfloat16, 128]}
    assert plain == {"ROWS_GUARANTEED_SAFE": True, "fwd_num_stages": 2}


def test_block_tiles_set_every_kernel_tile(monkeypatch):
    """A call of block tiles (a block mask of 32 or 64 rows) gets those tiles for the forward and all four backward
    tiles (inductor's default Hopper backward tiles cannot take them), not the tuned 128-row ones; user options
    still go on top; only on CUDA."""
    from ring_blocksparse import flex

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(1, 8, 2, 128))
    options = flex.kernel_options_for(q, {"ROWS_GUARANTEED_SAFE": True}, {"bwd_num_stages": 2}, tile=32)
    tiles = {key: value for key, value in options.items() if "BLOCK_" in key}
    assert tiles == {f"{side}BLOCK_{name}": 32 for side, names in (("fwd_", "MN"), ("bwd_", ("M1", "N1", "M2", "N2")))
                     for name in names}  # fmt: skip
    assert options["ROWS_GUARANTEED_SAFE"] and options["bwd_num_stages"] == 2
    assert flex.block_tile(torch.device("cuda"), 128, 2, None) == 64
    assert flex.block_tile(torch.device("cuda"), 128, 1, None) is None  # (128 rows: the tile already)
    assert flex.block_tile(torch.device("cpu"), 128, 2, None) is None  # (off CUDA every tile is a block already)
    assert flex.block_tile(torch.device("cuda"), 128, 8, None) is None  # (16 rows: not measured)


@pytest.mark.parametrize(
    ("layout", "causal", "window"),
    [("band", False, (-1, -1)), ("band", True, (-1, -1)), ("band", True, (40, 0)), ("band", False, (30, 50)),
     (None, True, (-1, -1)), (None, False, (-1, -1)), (None, True, (40, 0))],
)  # fmt: skip
def test_flagged_calls_find_a_key_in_the_first_tile_they_visit(layout, causal, window):
    """The contract of ROWS_GUARANTEED_SAFE checked on the rule itself, for every flagged strip call of
    dilated branches (with and without a band layout, windows; tiles of several layout blocks, as on the
    GPU): each row of a flagged call has a key in the first tile the kernel visits for it."""
    from ring_blocksparse.flex import safe_flags
    from ring_blocksparse.strided import strip_calls
    from ring_core.dilated import branches

    n, block, tile = 512, 8, 16
    i = torch.arange(n // block)
    band = ((i[:, None] - i[None, :]).abs() <= 5)[None] if layout else None
    pos = torch.arange(n)
    calls = strip_calls(
        pos, pos, num_heads=2, num_kv_heads=2, branch_list=branches([64, 128, 256], [1, 2, 4], "lse", 2),
        block_size=block, layout=band, causal=causal, q=torch.zeros(1, n, 2, 4), dense=False, masks=False,
        tile=tile, window=window,
    )  # fmt: skip
    flagged = 0
    for call in calls:
        tiles = call.tiles
        if tiles.empty:
            continue
        diagonal_only = call.rule.same_strip and causal and not (tiles.needs_layout or tiles.needs_segment)
        if not safe_flags(tiles.full, tiles.partial, diagonal_only)["ROWS_GUARANTEED_SAFE"]:
            continue
        flagged += 1
        allowed = call.rule.dense(1)[0, 0]  # (nq, nk): one layout for every head
        for row in range(tiles.full.shape[1]):
            partial, full = tiles.partial[0, row], tiles.full[0, row]
            first = int(partial.nonzero()[0]) if partial.any() else int(full.nonzero()[0])
            seen = allowed[row * tile : (row + 1) * tile, first * tile : (first + 1) * tile]
            assert bool(seen.any(-1).all()), f"row tile {row}: a query without a key in tile {first}"
    if layout is None and window == (-1, -1):
        assert flagged  # (no layout: every row's first tile holds its keys)


def test_strip_block_masks_carry_the_transposed_lists_flex_would_compute():
    """A per-call mask's backward lists (per key tile), sorted here from the transposed grids, are the ones
    FlexAttention's own transpose gives (as sets of tiles; order within a row ascending)."""
    from torch.nn.attention.flex_attention import BlockMask

    from ring_blocksparse.flex import StripRule, strip_block_mask, tile_cut
    from ring_blocksparse.strips import classify, strip_of

    positions = torch.arange(96)
    layout = build_pattern("random", density=0.5, seed=2, per_head=True).layout(96, 8, 3)
    q = k = strip_of(positions, 1, 2)
    tiles = classify(q, k, layout, block_size=8, segment=32, causal=True, tile=4)
    rule = StripRule(q, k, layout, block_size=8, segment=32, causal=True, device=torch.device("cpu"))
    pad = torch.zeros(2, len(k), dtype=torch.bool)  # a per-call mask (padding, none padded)
    pad[1, 5] = True
    mask, _ = strip_block_mask(
        tiles, rule, len(q), len(k), torch.device("cpu"), tile_cut(tiles.full, tiles.partial, 4, pad)
    )
    own = BlockMask.from_kv_blocks(
        mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices, BLOCK_SIZE=4
    )

    def tiles_of(counts, indices):
        keep = torch.arange(indices.shape[-1]) < counts[..., None]
        return torch.zeros(keep.shape, dtype=torch.bool).scatter_(-1, indices.long(), keep)

    assert bool(tiles.partial.any()) and bool(tiles.full.any())
    for mine, flex_own in (
        ((mask.q_num_blocks, mask.q_indices), (own.q_num_blocks, own.q_indices)),
        ((mask.full_q_num_blocks, mask.full_q_indices), (own.full_q_num_blocks, own.full_q_indices)),
    ):
        assert torch.equal(tiles_of(*mine), tiles_of(*flex_own))
        assert torch.equal(mine[0], flex_own[0])
