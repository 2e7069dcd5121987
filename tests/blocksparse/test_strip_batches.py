"""Strip calls of one shape batched into one kernel call (:mod:`ring_blocksparse.batches`): which calls join, and
that a batched run gives each call's results exactly (float64, the fused kernel's dense twin on the CPU; the fused
kernel batched in tests/blocksparse/test_cuda.py)."""

from __future__ import annotations

import os

import pytest
import torch
from tests.blocksparse.test_strip_ring_steps import _simulate
from tests.blocksparse.test_strip_windows import _module

import ring_blocksparse.batches as batches
import ring_blocksparse.strided as strided
import ring_blocksparse.strip_ring as strip_ring
from ring_blocksparse import build_pattern
from ring_blocksparse.batches import StripBatch, batch_groups, stacked
from ring_blocksparse.strided import strip_calls
from ring_blocksparse.strip_ring import build_strip_plan
from ring_core import reference_attention
from ring_core.dilated import branches
from ring_core.testing import Case, make_inputs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# (case, pattern of tests/blocksparse/test_strip_windows.py): every case has sparse (not dense) dilated calls
CASES = [
    (Case("dilated-gqa-window", 64, 4, (16, 32, 64), (1, 2, 4), kv_heads=2, batch=1, head_dim=5, window_size=(9, 3)),
     "none"),
    (Case("causal-padded", 64, 4, (32, 64), (1, 4), batch=1, head_dim=3, causal=True, padding=True), "band"),
    (Case("packed-anywhere", 72, 4, (12, 24, 72), (1, 2, 4), kv_heads=2, batch=1, head_dim=5, causal=True,
          documents=(0, 7, 30, 53, 72)), "random-per-head"),
    (Case("head-groups", 64, 6, (8, 32, 64), (1, 2, 4), merge="head_groups", batch=1, head_dim=3), "random-per-head"),
]  # fmt: skip


def _calls(n: int, heads: int, kv_heads: int, rates: tuple[int, ...], documents: bool = False):
    segments = tuple(n // len(rates) * (i + 1) for i in range(len(rates)))
    return strip_calls(
        torch.arange(n), torch.arange(n), num_heads=heads, num_kv_heads=kv_heads,
        branch_list=branches(segments, rates, "lse", heads), block_size=8, layout=None, causal=False,
        q=torch.zeros(1, n, heads, 4), dense=False, documents=documents,
    )  # fmt: skip


def _count_batches(monkeypatch, module, name: str) -> list[int]:
    """Wrap ``module.name`` (a function returning a run's units) to record how many batches each call of it made."""
    counts: list[int] = []
    real = getattr(module, name)

    def recording(*args):
        units = real(*args)
        counts.append(sum(isinstance(u, StripBatch) for u in units))
        return units

    monkeypatch.setattr(module, name, recording)
    return counts


def _layout(case: Case, pattern: str) -> dict:
    layout = _module(case, pattern).layout_for(case.seq_len, case.heads)
    return {} if layout is None else {"block_layout": layout, "block_size": 8}


def test_each_branch_is_one_batch():
    """Rates 1, 2, 4 on 4 heads: the rate-1 call alone (it writes the results first), each other branch's offsets one
    batch; with packed documents each offset's calls on every strip of its rate one batch (21 calls, 7 kernel calls)."""
    calls = _calls(64, 4, 4, (1, 2, 4))
    assert [len(g) for g in batch_groups(calls)] == [1, 2, 4]
    packed = _calls(64, 4, 4, (1, 2, 4), documents=True)
    assert len(packed) == 21
    assert [len(g) for g in batch_groups(packed)] == [1, 2, 2, 4, 4, 4, 4]


def test_calls_sharing_key_views_stay_apart():
    """Two calls reading the same key rows and key/value head (packed documents, one key/value head: the offsets'
    calls on one strip) would add their gradients into one view: they are not batched."""
    calls = _calls(64, 4, 1, (2,), documents=True)
    by_strip = sorted(calls, key=lambda c: c.q.offset)  # offsets 0 and 1 on strip 0, then on strip 1
    # (offset 1 on strip 0 and offset 0 on strip 1 share no key rows, but the second is a head back: apart too)
    assert [len(g) for g in batch_groups(by_strip)] == [1, 1, 1, 1]
    assert [len(g) for g in batch_groups(calls)] == [2, 2]  # (plan order: each offset on both strips)


def test_calls_stepping_back_stay_apart():
    """Packed documents select the calls that serve them (:func:`~ring_blocksparse.strided.document_calls`): an
    offset's last strip may come right before the next offset's first, a step back in rows (a negative batch stride,
    which no view can have): those calls start a new batch."""
    calls = _calls(64, 4, 1, (4,), documents=True)
    assert [(c.q.offset, c.heads.start) for c in calls[:5]] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1)]
    selected = [calls[i] for i in (0, 2, 3, 4, 6)]  # rows 0, 2, 3 of head 0, then rows 0, 2 of head 1
    assert batch_groups(selected) == [[0, 1], [2], [3, 4]]


def test_stacked_views():
    x = torch.randn(1, 24, 6, 3)
    views = [x[:, o::4, o::2] for o in range(2)]
    torch.testing.assert_close(stacked(views), torch.cat(views))
    assert stacked(views).data_ptr() == x.data_ptr()
    with pytest.raises(AssertionError, match="step evenly"):
        stacked([x[:, 0::4], x[:, 1::4], x[:, 3::4]])


@pytest.mark.parametrize(("case", "pattern"), CASES, ids=[case.name for case, _ in CASES])
def test_batched_run_equals_each_call(case, pattern, monkeypatch):
    """The same module with and without batches: equal outputs and gradients (float64), and both the reference's.
    Fails if a batch reads another call's tiles, rule, padding or documents, or writes another call's rows."""
    q, k, v, mask = make_inputs(case, torch.float64, seed=3)
    dout = torch.randn_like(q)
    options = {**case.forward_options(), "is_causal": case.causal}
    if mask is not None:
        options["key_padding_mask"] = mask
    units = _count_batches(monkeypatch, strided, "strip_batches")
    results = []
    for batched in (True, False):
        if not batched:  # (the A/B switch: every call alone)
            assert units and all(count > 0 for count in units)
            batched_runs = len(units)
            monkeypatch.setenv(batches.BATCH_ENV, "0")
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = _module(case, pattern)(*leaves, **options)
        results.append((out, *torch.autograd.grad(out, leaves, dout)))
    assert len(units) > batched_runs and not any(units[batched_runs:])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    reference = reference_attention(
        *leaves, **{**case.config, **case.reference_options}, is_causal=case.causal, key_padding_mask=mask,
        **_layout(case, pattern),
    )  # fmt: skip
    torch.testing.assert_close(results[0][0], reference, rtol=1e-10, atol=1e-12)
    for got, expected in zip(results[0][1:], torch.autograd.grad(reference, leaves, dout)):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


def test_ring_steps_run_batches(monkeypatch):
    """Each rank's ring steps (the benchmark's one-process simulation, 2 ranks, batch 1) batch a branch's offsets
    too, and stay exact: the reference's output and gradients (float64)."""
    n, h, segments, rates, window = 96, 4, (32, 96), (1, 2), (9, 3)
    generator = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(1, n, h, 4, generator=generator, dtype=torch.float64) for _ in range(4))
    layout = build_pattern("random", density=0.5, seed=2, per_head=True).layout(n, 8, h)
    batches = _count_batches(monkeypatch, strip_ring, "strip_units")

    def plan_of(rank: int):
        return build_strip_plan(
            seq_len=n, rank=rank, world_size=2, layout_kind="contiguous", q=q[:, : n // 2], num_heads=h,
            num_kv_heads=h, branch_list=branches(segments, rates, "lse", h), block_size=8, layout=layout,
            causal=False, window=window,
        )  # fmt: skip

    out, grads, _ = _simulate((q, k, v, dout), plan_of)
    # the rate-2 branch's two offsets, on every rank's own shard (a window's step across shards may need one)
    assert batches and sum(batches) >= 2
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(
        *leaves, segment_lengths=segments, dilation_rates=rates, window_size=window, block_layout=layout, block_size=8
    )
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected, leaves, dout)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_benchmark_times_the_unbatched_rows_with_batching_off():
    """The strips benchmark's ``unbatched`` section: each batched band row again, with ``RING_BLOCKSPARSE_BATCH=0``
    set only while it runs, against that row."""
    from tools.bench.blocksparse_strips import unbatched_rows

    assert batches.BATCH_ENV not in os.environ
    base = {"compiled": False, "method": "flex"}
    record = {
        "packed_documents": [0, 40, 96],
        "results": [
            {**base, "section": "dilated", "name": "band", "causal": False, "fwd_bwd_ms": 2.0},
            {**base, "section": "dilated", "name": "band", "causal": True, "fwd_bwd_ms": 1.0},
            {**base, "section": "packed", "name": "band", "causal": True, "compiled": True, "fwd_bwd_ms": 5.0},
        ],
    }
    seen, ratios = [], []

    def row(section, name, causal, segs, rts, layout, documents=None):
        seen.append((name, causal, documents, os.environ.get(batches.BATCH_ENV)))
        return {"fwd_bwd_ms": 3.0}

    def finish(entry, ratio, baseline, target):
        ratios.append((ratio, entry["fwd_bwd_ms"] / baseline, target))

    unbatched_rows(row, finish, record, None, [32], [1])
    assert seen == [("dilated band", False, None, "0"), ("dilated band", True, None, "0")]  # (no eager packed row)
    assert ratios == [("vs_batched", 1.5, None), ("vs_batched", 3.0, None)]
    assert batches.BATCH_ENV not in os.environ


def test_benchmark_times_random_dilated_rows_at_128_row_tiles():
    """The strips benchmark's ``coarse`` section: each random + dilated row again with
    ``RING_BLOCKSPARSE_BLOCK_TILES=0`` set only while it runs, against that row."""
    from ring_blocksparse.flex import BLOCK_TILES_ENV
    from tools.bench.blocksparse_strips import coarse_rows

    assert BLOCK_TILES_ENV not in os.environ
    base = {"section": "dilated", "name": "random"}
    record = {"results": [{**base, "causal": False, "fwd_bwd_ms": 2.0}, {**base, "causal": True, "error": "x"}]}
    seen, ratios = [], []

    def row(section, name, causal, segs, rts, layout):
        seen.append((section, name, causal, os.environ.get(BLOCK_TILES_ENV)))
        return {"fwd_bwd_ms": 3.0}

    def finish(entry, ratio, baseline, target):
        ratios.append((ratio, entry["fwd_bwd_ms"] / baseline, target))

    coarse_rows(row, finish, record, None, [32], [1])
    assert seen == [("128-row tiles", "dilated random", False, "0")]  # (no row where the measured one failed)
    assert ratios == [("vs_block_tiles", 1.5, None)]
    assert BLOCK_TILES_ENV not in os.environ
