"""Block-sparse dilated attention on one process vs the float64 dense masked reference."""

from __future__ import annotations

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention, block_sparse_dilated_attention, build_pattern
from ring_core import create_attention, hookimpl
from ring_core.kernels import MathKernel
from ring_core.testing import Case, check_attention

PATTERNS = {
    "local_window": {"window": 10},
    "local_window-sliding": {"window": 9, "sliding": True},
    "dilated_sparse": {"dilation": 3},
    "global_local": {"global_tokens": 3, "window": 8},
    "random": {"density": 0.3, "seed": 7},
    "strided": {"stride": 15},
}
CONFIGS = {
    "dense": ((64,), (1,)),
    "dilated": ((8, 24), (1, 2)),  # segments not multiples of the block either
}


def _pattern(name: str):
    return name.split("-")[0], PATTERNS[name]


def _check(attn, case: Case, layout, block_size: int, seed: int = 0) -> None:
    result = check_attention(
        attn, case, torch.float64, seed=seed, reference_options={"block_layout": layout, "block_size": block_size}
    )
    assert result.passed, f"{case}: errors {result.errors} > {result.tolerance}"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("name", PATTERNS, ids=str)
def test_pattern_matches_reference(name, config, causal):
    """Every pattern, dense and dilated, causal and not; N=47 is not a multiple of the block size 5.

    With rate 2 and block 5, tiles straddle blocks, so masked tiles are exercised too.
    """
    segments, rates = CONFIGS[config]
    pattern, options = _pattern(name)
    case = Case(f"{name}-{config}", 47, 4, segments, rates, causal=causal)
    attn = create_attention("block_sparse_ring_dilated", **case.config, block_size=5, pattern=pattern, **options)
    layout = build_pattern(pattern, **options).layout(47, 5, 4)
    _check(attn, case, layout, 5)


@pytest.mark.parametrize(
    "case",
    [
        Case("gqa-pad-causal", 30, 6, (6, 12), (1, 3), kv_heads=2, causal=True, padding=True),
        Case("head-groups-gqa", 27, 6, (4, 9, 27), (1, 3, 9), kv_heads=3, merge="head_groups"),
        Case("rate>block", 33, 4, (10, 30), (5, 10), causal=True),
    ],
    ids=str,
)
def test_per_head_layout_gqa_padding(case):
    """A per-head random layout with GQA, key padding, head groups and rates larger than the block."""
    layout = build_pattern("random", density=0.4, seed=3, per_head=True).layout(case.seq_len, 3, case.heads)
    attn = BlockSparseRingDilatedAttention(**case.config, block_size=3, block_layout=layout)
    _check(attn, case, layout, 3, seed=5)


def test_float32_within_tolerance():
    case = Case("f32", 40, 4, (8, 40), (1, 4), causal=True)
    attn = BlockSparseRingDilatedAttention(**case.config, block_size=8, pattern="strided", stride=16)
    result = check_attention(
        attn, case, torch.float32, reference_options={"block_layout": attn.layout_for(40, 4), "block_size": 8}
    )
    assert result.passed, result.errors


def test_functional_form_import_paths():
    """The functional form lives in ring_blocksparse.functional and stays importable from its old module."""
    import ring_blocksparse.attention as attention
    import ring_blocksparse.functional as functional

    assert functional.block_sparse_dilated_attention is block_sparse_dilated_attention
    assert attention.block_sparse_dilated_attention is block_sparse_dilated_attention
    assert block_sparse_dilated_attention.__module__ == "ring_blocksparse.functional"


def test_rows_with_no_allowed_key_give_zero():
    """A query block whose layout row is empty outputs 0 and gets zero gradient; no NaN anywhere."""
    layout = torch.ones(1, 5, 5, dtype=torch.bool)
    layout[0, 2] = False  # query block 2 sees nothing
    layout[0, 4, 3:] = False  # causal + this: the first rows of block 4 see nothing after block 2..
    layout[0, 4, :3] = False
    q, k, v = (torch.randn(2, 18, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = block_sparse_dilated_attention(
        q, k, v, segment_lengths=[18], dilation_rates=[1], block_size=4, block_layout=layout, is_causal=True
    )
    assert torch.isfinite(out).all()
    assert out[:, 8:12].abs().max() == 0 and out[:, 16:].abs().max() == 0
    out.sum().backward()
    assert q.grad[:, 8:12].abs().max() == 0 and q.grad[:, 16:].abs().max() == 0
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    _check(
        BlockSparseRingDilatedAttention([18], [1], block_size=4, block_layout=layout),
        Case("empty-rows", 18, 3, (18,), (1,), causal=True),
        layout,
        4,
    )


class CountingKernel(MathKernel):
    """The math kernel, counting the (query, key) pairs it is given."""

    name = "counting"
    priority = -100

    def __init__(self) -> None:
        self.pairs = 0

    def forward(self, q, k, v, **kwargs):
        self.pairs += q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
        return super().forward(q, k, v, **kwargs)


def test_empty_tiles_are_never_computed(fresh_registry):
    """local_window of 8 on N=64, block 8: the kernel sees exactly the allowed pairs, 1/8 of dense."""
    counting = CountingKernel()

    class Plugin:
        @hookimpl
        def register_kernels(self, register):
            register(counting)

    fresh_registry().register_plugin(Plugin(), "counting-kernel")
    attn = BlockSparseRingDilatedAttention([64], [1], block_size=8, pattern="local_window", window=8, kernel="counting")
    q = torch.randn(1, 64, 2, 4, dtype=torch.float64)
    attn(q, q, q)
    assert counting.pairs == 64 * 8 * 2 == attn.last_plan.computed_pairs
    counting.pairs = 0
    attn(q, q, q, is_causal=True)  # diagonal tiles only, with the causal flag
    assert counting.pairs == 64 * 8 * 2


def test_no_pattern_is_plain_dilated():
    q, k, v = (torch.randn(2, 21, 4, 8, dtype=torch.float64) for _ in range(3))
    expected = create_attention("dilated", segment_lengths=[6, 12], dilation_rates=[1, 3])(q, k, v, is_causal=True)
    attn = create_attention(
        "BlockSparseRingDilatedAttention", segment_lengths=[6, 12], dilation_rates=[1, 3], block_size=5
    )
    torch.testing.assert_close(attn(q, k, v, is_causal=True), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size must be a positive int, got 0"),
        ({"pattern": "nope"}, "unknown block-sparse pattern 'nope'; registered patterns: "),
        ({"pattern": "local_window", "size": 3}, r"pattern 'local_window' got unknown option\(s\) \['size'\]"),
        ({"pattern": "local_window"}, r"pattern 'local_window' needs option\(s\) \['window'\]"),
        ({"pattern": "random", "density": 1.5}, r"pattern 'random': density must be a float in \(0, 1\], got 1.5"),
        ({"pattern": "global_local", "global_tokens": 0, "window": 4}, "global_tokens must be a positive int, got 0"),
        ({"window": 4}, r"pattern options \['window'\] were given without a pattern"),
        ({"layout": "spiral"}, "layout must be one of"),
        (
            {"pattern": "local_window", "window": 4, "block_layout": torch.ones(1, 2, 2, dtype=torch.bool)},
            "either pattern or block_layout",
        ),
    ],
)
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseRingDilatedAttention([8], [1], **{"block_size": 4, **kwargs})


def test_layout_shape_checked_before_work():
    attn = BlockSparseRingDilatedAttention([8], [1], block_size=4, block_layout=torch.ones(1, 3, 3, dtype=torch.bool))
    q = torch.randn(1, 16, 2, 4)
    with pytest.raises(ValueError, match=r"block_layout must have shape .* \(1 or 2, 4, 4\) for N=16, block_size=4"):
        attn(q, q, q)
    with pytest.raises(ValueError, match="window must be a multiple of block_size"):
        BlockSparseRingDilatedAttention([8], [1], block_size=4, pattern="local_window", window=6)(q, q, q)


def test_large_batches_are_split(monkeypatch):
    """Bounding the gathered rows per call, cutting key lists into chunks and padding batches to
    powers of two change the calls, never the result."""
    import ring_blocksparse.plan

    case = Case("split", 64, 2, (64,), (1,), causal=True, padding=True)
    whole = BlockSparseRingDilatedAttention(**case.config, block_size=4, pattern="random", density=0.5, exact=False)
    _check(whole, case, whole.layout_for(64, 2), 4)
    monkeypatch.setattr(ring_blocksparse.plan, "MAX_GATHERED_ROWS", 100)
    monkeypatch.setattr(ring_blocksparse.plan, "MAX_CHUNK_TILES", 3)
    split = BlockSparseRingDilatedAttention(**case.config, block_size=4, pattern="random", density=0.5, exact=False)
    _check(split, case, split.layout_for(64, 2), 4)
    calls = [g for gs in split.last_plan.groups.values() for g in gs]
    assert all(g.shape[0] * g.shape[2] <= 100 or g.shape[0] == 1 for g in calls)  # one query tile is never cut
    assert all(g.shape[2] <= 3 * 4 for g in calls)  # at most 3 key tiles of 4 per call
    assert any(g.real < g.shape[0] for g in split.last_plan.all_groups())  # some batches were padded
    assert len(calls) > sum(len(gs) for gs in whole.last_plan.groups.values())
    assert split.last_plan.computed_pairs == whole.last_plan.computed_pairs


@pytest.mark.parametrize("transposed", [False, True], ids=["by-query-tile", "by-key-tile"])
def test_both_backward_batchings(transposed):
    """The backward batched by query tile (as the forward) and by key tile give the same exact gradients."""
    case = Case("gqa-pad-causal-dilated", 37, 4, (6, 12, 36), (1, 2, 3), kv_heads=2, causal=True, padding=True)
    layout = build_pattern("random", density=0.5, seed=2, per_head=True).layout(case.seq_len, 5, case.heads)
    attn = BlockSparseRingDilatedAttention(
        **case.config, block_size=5, block_layout=layout, transposed_backward=transposed
    )
    _check(attn, case, layout, 5, seed=9)
    assert (attn.last_plan.backward_groups is not None) == transposed


def test_dropout_backward_is_the_gradient_of_the_forward():
    """With dropout (same seed each call) the backward (batched like the forward) is the true gradient."""
    attn = BlockSparseRingDilatedAttention([8, 16], [1, 2], block_size=4, pattern="random", density=0.6, dropout=0.3)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def run(q, k, v):
        torch.manual_seed(1)  # the same dropout masks on every call
        return attn(q, k, v, is_causal=True)

    assert not torch.equal(run(q, k, v), attn.eval()(q, k, v, is_causal=True))  # dropout is on in training
    attn.train()
    assert torch.autograd.gradcheck(run, (q, k, v))


@pytest.mark.parametrize("method", ["gather", "flex"])
def test_a_module_that_has_run_pickles_and_computes_the_same(method):
    """``torch.save`` of a model, or a process spawned with it, pickles the module after calls: its plans (the strips'
    block masks hold closures) are not pickled but rebuilt; the copy computes the same."""
    import pickle

    attn = BlockSparseRingDilatedAttention([16, 32], [1, 2], block_size=8, pattern="random", density=0.5, method=method)
    attn.sparse_kernel = "math"  # (the strips' CPU twin: the plan and block masks of the fused kernel's path)
    q, k, v = (torch.randn(1, 64, 4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad():
        out = attn(q, k, v, is_causal=True)
        copy = pickle.loads(pickle.dumps(attn))
        assert copy.last_plan is None and torch.equal(copy(q, k, v, is_causal=True), out)
    assert attn.last_method == copy.last_method == method
