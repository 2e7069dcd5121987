"""Packed documents (``cu_seqlens``) and sliding windows (``window_size``) on one device.

Errors name the parameter before any work; the float64 reference follows SPEC.md's
definitions; flash-attn's varlen layout is accepted; and kernels see only the (query,
key) pairs that documents, windows and branches allow (a counting kernel).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import ring_core
from ring_core import dilated_attention, hookimpl, reference_attention, ring_dilated_attention
from ring_core.kernels import MathKernel

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]


def qkv(b=1, n=8, h=2, d=4, requires_grad=False):
    tensors = [torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3)]
    return [t.requires_grad_(requires_grad) for t in tensors]


class CountingKernel(MathKernel):
    """The math kernel (windows as masks), counting the (query, key) pairs of every forward call, per head."""

    name = "counting"
    priority = -100

    def __init__(self) -> None:
        self.pairs = 0

    def forward(self, q, k, v, **kwargs):
        self.pairs += q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
        return super().forward(q, k, v, **kwargs)


@pytest.fixture
def counting(fresh_registry):
    kernel = CountingKernel()

    class Plugin:
        @hookimpl
        def register_kernels(self, register):
            register(kernel)

    fresh_registry().register_plugin(Plugin(), "counting-kernel")
    return kernel


# -- errors: one test each, naming the parameter --------------------------------------------------

BAD_CU_SEQLENS = {
    "start": (torch.tensor([1, 4, 8]), ValueError, r"cu_seqlens must start at 0, got \[1, 4, 8\]"),
    "end": (torch.tensor([0, 4, 7]), ValueError, r"cu_seqlens must end at N=8 \(the packed length\), got 7"),
    "decreasing": (
        torch.tensor([0, 5, 3, 8]),
        ValueError,
        r"cu_seqlens must be non-decreasing, got 5 then 3 at index 2",
    ),
    "two-dims": (torch.tensor([[0, 8]]), TypeError, r"cu_seqlens must be a 1-D integer tensor, got int64 of shape"),
    "float": (torch.tensor([0.0, 8.0]), TypeError, r"cu_seqlens must be a 1-D integer tensor, got float32"),
    "list": ([0, 8], TypeError, r"cu_seqlens must be a 1-D integer torch.Tensor, got list"),
}


@pytest.mark.parametrize("bad", sorted(BAD_CU_SEQLENS))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_bad_cu_seqlens_names_the_parameter(impl, bad):
    cu_seqlens, error, match = BAD_CU_SEQLENS[bad]
    attn = ring_core.create_attention(impl.name, segment_lengths=[8], dilation_rates=[1], **impl.options)
    with pytest.raises(error, match=match):
        attn(*qkv(), cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_cu_seqlens_needs_a_batch_of_one(impl):
    attn = ring_core.create_attention(impl.name, segment_lengths=[8], dilation_rates=[1], **impl.options)
    with pytest.raises(ValueError, match=r"cu_seqlens needs a batch of one \(documents packed along N, B=1\), got B=2"):
        attn(*qkv(b=2), cu_seqlens=torch.tensor([0, 8]))


BAD_WINDOWS = {
    "below -1": ((-2, 0), ValueError, r"window_size must be \(left, right\) with each >= -1 \(-1: unbounded\)"),
    "one int": (4, TypeError, r"window_size must be a pair of ints \(left, right\), -1 meaning unbounded, got 4"),
    "three": ((1, 2, 3), TypeError, r"window_size must be a pair of ints"),
    "float": ((1.5, 2), TypeError, r"window_size must be a pair of ints .* got \(1.5, 2\)"),
    "bool": ((True, 1), TypeError, r"window_size must be a pair of ints"),
}


@pytest.mark.parametrize("bad", sorted(BAD_WINDOWS))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_bad_window_size_names_the_parameter(impl, bad):
    window, error, match = BAD_WINDOWS[bad]
    with pytest.raises(error, match=match):
        ring_core.create_attention(
            impl.name, segment_lengths=[8], dilation_rates=[1], window_size=window, **impl.options
        )


@pytest.mark.parametrize("function", [dilated_attention, ring_dilated_attention])
def test_functional_errors_come_before_any_work(function, counting):
    config = {"segment_lengths": [8], "dilation_rates": [1], "kernel": "counting"}
    with pytest.raises(ValueError, match="window_size must be"):
        function(*qkv(), **config, window_size=(-3, 1))
    with pytest.raises(ValueError, match="cu_seqlens must end at N=8"):
        function(*qkv(), **config, cu_seqlens=torch.tensor([0, 9]))
    assert counting.pairs == 0
    function(*qkv(), **config, window_size=(2, 1), cu_seqlens=torch.tensor([0, 3, 8]))
    assert counting.pairs > 0


# -- the reference ------------------------------------------------------------------------------


def test_reference_window_is_the_definition():
    """A brute-force softmax over the keys ``t - left <= s <= t + right`` (and ``s <= t`` when causal)."""
    q, k, v = qkv(n=11, h=3)
    for window, causal in (((2, -1), False), ((3, 0), True), ((1, 2), False), ((-1, 1), True), ((0, 0), False)):
        expected = torch.zeros_like(q)
        for t in range(11):
            keys = [s for s in range(11) if (window[0] < 0 or s >= t - window[0])]
            keys = [s for s in keys if (window[1] < 0 or s <= t + window[1]) and (not causal or s <= t)]
            scores = torch.einsum("bhd,bshd->bhs", q[:, t], k[:, keys]) / math.sqrt(4)
            expected[:, t] = torch.einsum("bhs,bshd->bhd", scores.softmax(-1), v[:, keys])
        actual = reference_attention(q, k, v, window_size=window, is_causal=causal)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_reference_packed_is_each_document_alone():
    q, k, v = qkv(n=30, h=4)
    bounds = [0, 7, 7, 19, 30]
    config = {"segment_lengths": [4, 8], "dilation_rates": [1, 2], "is_causal": True, "window_size": (5, -1)}
    packed = reference_attention(q, k, v, **config, cu_seqlens=torch.tensor(bounds))
    alone = [
        reference_attention(q[:, a:b], k[:, a:b], v[:, a:b], **config) for a, b in itertools.pairwise(bounds) if b > a
    ]
    torch.testing.assert_close(packed, torch.cat(alone, 1), rtol=0, atol=1e-14)


# -- flash-attn's varlen layout -----------------------------------------------------------------


@pytest.mark.parametrize("function", [dilated_attention, ring_dilated_attention])
def test_varlen_layout(function):
    """``(total, H, D)`` with ``cu_seqlens`` is a batch of one: same numbers, gradients, lse ``(H, total)``."""
    q, k, v = qkv(n=21, h=4, requires_grad=True)
    options = {"segment_lengths": [4, 8], "dilation_rates": [1, 2], "window_size": (3, 2)}
    cu_seqlens = torch.tensor([0, 5, 13, 21], dtype=torch.int32)
    batched = function(q, k, v, **options, cu_seqlens=cu_seqlens)
    varlen = function(*(x[0] for x in (q, k, v)), **options, cu_seqlens=cu_seqlens)
    assert varlen.shape == (21, 4, 4)
    torch.testing.assert_close(varlen, batched[0], rtol=0, atol=0)
    grads = torch.autograd.grad(varlen.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    if function is dilated_attention:
        _, lse = function(*(x[0] for x in (q, k, v)), **options, cu_seqlens=cu_seqlens, return_lse=True)
        assert lse.shape == (4, 21)


def test_three_dims_without_cu_seqlens_is_an_error():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dims \(B, N, H, D\), got shape \(8, 2, 4\)"):
        dilated_attention(q[0], k[0], v[0], segment_lengths=[8], dilation_rates=[1])


# -- work only where documents, windows and branches allow ----------------------------------------

SINGLE_DEVICE = {
    "dilated": lambda **config: ring_core.DilatedAttention(**config, kernel="counting"),
    "ring_dilated": lambda **config: ring_core.RingDilatedAttention(**config, kernel="counting"),
    "ring_dilated_flash": lambda **config: ring_core.create_attention(
        "ring_dilated_flash", **config, kernel="counting"
    ),
}


@pytest.mark.parametrize("name", sorted(SINGLE_DEVICE))
def test_window_costs_the_window_not_the_segment(name, counting):
    """N = 1024, one segment, window (63, 0) causal: queries in tiles of 64, each with the 63 keys before it and
    its own 64 (the first tile: its own 64 only): 64 * 64 + 15 * 64 * 127 pairs per head, under twice the
    allowed pairs and an eighth of the segment."""
    h = 2
    attn = SINGLE_DEVICE[name](segment_lengths=[1024], dilation_rates=[1], window_size=(63, 0))
    attn(*qkv(n=1024, h=h), is_causal=True)
    computed = h * (64 * 64 + 15 * 64 * 127)
    allowed = h * (sum(t + 1 for t in range(63)) + (1024 - 63) * 64)
    assert counting.pairs == computed
    assert computed <= 2 * allowed and computed <= h * 1024 * 1024 // 8


def _dilated_pairs(lengths, segments, rates, heads):
    """Pairs (per head, summed) of SPEC.md's segments for documents of ``lengths`` run one by one: per branch
    and offset, each document's selected positions in segments of ``w / r`` (a shorter last one)."""
    total = 0
    for length in lengths:
        for w, r in zip(segments, rates):
            for offset in range(r):
                count = len(range(offset, length, r))
                full, rest = divmod(count, w // r)
                heads_of_offset = len(range(offset, heads, r))
                total += heads_of_offset * (full * (w // r) ** 2 + rest**2)
    return total


@pytest.mark.parametrize("name", sorted(SINGLE_DEVICE))
def test_documents_cost_their_own_segments(name, counting):
    """Documents [100, 0, 256, 156] (one empty, one shorter than the 128 segment): every kernel call stays inside
    a document's segment; nothing is computed across documents."""
    bounds = torch.tensor([0, 100, 100, 356, 512])
    lengths = [100, 0, 256, 156]
    for segments, rates in (([512], [1]), ([64, 128], [1, 2])):
        counting.pairs = 0
        attn = SINGLE_DEVICE[name](segment_lengths=segments, dilation_rates=rates)
        attn(*qkv(n=512, h=4), is_causal=True, cu_seqlens=bounds)
        assert counting.pairs == _dilated_pairs(lengths, segments, rates, 4), segments
    assert _dilated_pairs(lengths, [512], [1], 4) < 4 * 512 * 512 * 0.4


def test_block_sparse_window_skips_tiles_outside_it(counting):
    """Block size 8, N = 64, window (8, 0) causal: a query tile sees itself (causal flag) and the tile before (a
    mask): 15 tile pairs of 8 x 8 per head, not 36; the kernel also sees one padded pair (7 masked pairs are
    batched as 8)."""
    attn = ring_core.create_attention(
        "block_sparse_ring_dilated", segment_lengths=[64], dilation_rates=[1], block_size=8, window_size=(8, 0),
        kernel="counting",
    )  # fmt: skip
    attn(*qkv(n=64, h=2), is_causal=True)
    assert attn.last_plan.computed_pairs == 2 * 15 * 64
    assert counting.pairs == 2 * 16 * 64


def test_block_sparse_documents_skip_tiles_across_documents(counting):
    """Documents [0, 20), [20, 64), block size 8: tiles restart at 20; a tile pair never spans two documents
    (the kernel also sees the batches' padding, copies of real pairs, under a third more)."""
    attn = ring_core.create_attention(
        "block_sparse_ring_dilated", segment_lengths=[64], dilation_rates=[1], block_size=8, kernel="counting"
    )
    attn(*qkv(n=64, h=2), cu_seqlens=torch.tensor([0, 20, 64]))
    # tiles of 8 restart per document: [8, 8, 4] and [8] * 5 + [4]; pairs within a document only
    first, second = [8, 8, 4], [8, 8, 8, 8, 8, 4]
    expected = 2 * (sum(a * b for a in first for b in first) + sum(a * b for a in second for b in second))
    assert attn.last_plan.computed_pairs == expected
    assert expected <= counting.pairs < expected * 4 / 3
