"""The sparse ring on 2 and 4 gloo ranks (real processes): exact results and bytes that are never sent."""

from __future__ import annotations

import pytest
import torch
from tests.distributed_helpers import run_distributed

from ring_blocksparse import BlockSparseRingDilatedAttention, build_pattern
from ring_core import reference_attention
from ring_core.sharding import shard_positions, shard_sequence

pytestmark = pytest.mark.distributed

# name -> (N, H, H_kv, segment_lengths, dilation_rates, block, pattern, options, causal, padding, merge)
SPECS = {
    "local-window-causal": (40, 2, 2, (64,), (1,), 3, "local_window", {"window": 6}, True, False, "lse"),
    "random-dilated-gqa-pad": (40, 4, 2, (8, 20), (1, 2), 3, "random", {"density": 0.3, "seed": 1}, True, True, "lse"),
    "global-local-dilated": (
        48,
        3,
        3,
        (12, 48),
        (1, 3),
        4,
        "global_local",
        {"global_tokens": 5, "window": 8},
        False,
        False,
        "lse",
    ),
    "strided-head-groups": (48, 4, 4, (6, 24), (2, 3), 4, "strided", {"stride": 8}, True, False, "head_groups"),
    "dilated-sparse": (40, 2, 1, (10, 40), (1, 5), 5, "dilated_sparse", {"dilation": 2}, False, True, "lse"),
    "window-inside-shard": (32, 2, 2, (32,), (1,), 4, "local_window", {"window": 4}, True, False, "lse"),
    "no-pattern": (32, 2, 2, (32,), (1,), 4, None, {}, False, False, "lse"),
    "sliding-window": (32, 2, 2, (32,), (1,), 4, "local_window", {"window": 5, "sliding": True}, False, False, "lse"),
    "empty-rows": (
        32,
        2,
        2,
        (16, 32),
        (1, 2),
        4,
        "random",
        {"density": 0.2, "include_diagonal": False, "exact": False},
        True,
        False,
        "lse",
    ),
}


def _inputs(name: str):
    n, h, hkv, *_ = SPECS[name]
    padding = SPECS[name][9]
    generator = torch.Generator().manual_seed(len(name))
    q = torch.randn(2, n, h, 4, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, n, hkv, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(2, n, h, 4, generator=generator, dtype=torch.float64)
    mask = None
    if padding:
        mask = torch.rand(2, n, generator=generator) < 0.3
        mask[:, 0] = False
    return q, k, v, dout, mask


def _module(name: str, layout: str) -> BlockSparseRingDilatedAttention:
    _, _, _, segments, rates, block, pattern, options, _, _, merge = SPECS[name]
    return BlockSparseRingDilatedAttention(
        segments, rates, block_size=block, pattern=pattern, layout=layout, merge=merge, **options
    )


def _run_rank(rank: int, world_size: int, names: list[str], layouts: list[str]) -> dict:
    return {layout: _run_layout(rank, world_size, names, layout) for layout in layouts}


def _run_layout(rank: int, world_size: int, names: list[str], layout: str) -> dict:
    results = {}
    for name in names:
        q, k, v, dout, mask = _inputs(name)
        local = [
            shard_sequence(x, layout, rank=rank, world_size=world_size).clone().requires_grad_() for x in (q, k, v)
        ]
        local_mask = None if mask is None else shard_sequence(mask, layout, rank=rank, world_size=world_size)
        attn = _module(name, layout)
        out = attn(*local, is_causal=SPECS[name][8], key_padding_mask=local_mask)
        out.backward(shard_sequence(dout, layout, rank=rank, world_size=world_size))
        stats = attn.comm_stats
        results[name] = {
            "out": out.detach().numpy(),  # numpy: tensors would travel as shared memory of a dead process
            "grads": [x.grad.numpy() for x in local],
            "sent": dict(stats.sent),
            "received": dict(stats.received),
        }
    return results


def _reference(name: str):
    n, h, _, segments, rates, block, pattern, options, causal, _, merge = SPECS[name]
    q, k, v, dout, mask = _inputs(name)
    layout = None if pattern is None else build_pattern(pattern, **options).layout(n, block, h)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(
        *leaves,
        segment_lengths=segments,
        dilation_rates=rates,
        merge=merge,
        is_causal=causal,
        key_padding_mask=mask,
        block_layout=layout,
        block_size=None if layout is None else block,
    )
    ref.backward(dout)
    return ref.detach(), [x.grad for x in leaves]


def _check_exact(results: list[dict], names: list[str], layout: str) -> None:
    world = len(results)
    for name in names:
        ref, ref_grads = _reference(name)
        n = ref.shape[1]
        for rank, result in enumerate(results):
            rows = shard_positions(n, rank, world, layout)
            got = result[name]
            torch.testing.assert_close(
                torch.from_numpy(got["out"]), ref[:, rows], rtol=1e-10, atol=1e-12, msg=f"{name} rank {rank}"
            )
            for label, grad, expected in zip("qkv", got["grads"], ref_grads):
                torch.testing.assert_close(
                    torch.from_numpy(grad), expected[:, rows], rtol=1e-9, atol=1e-11, msg=f"{name} rank {rank} d{label}"
                )


def _row_bytes(name: str) -> int:
    _, _, hkv, *_ = SPECS[name]
    return 2 * hkv * (4 + 4) * 8  # batch 2, K and V of head dim 4, float64


LAYOUTS = ["contiguous", "zigzag"]


def test_two_ranks():
    """Every spec, both layouts, in one spawn of 2 ranks."""
    names = list(SPECS)
    by_rank = run_distributed(_run_rank, 2, names, LAYOUTS)
    for layout in LAYOUTS:
        _check_exact([r[layout] for r in by_rank], names, layout)
    # a window inside every shard: nothing is sent or received, forward or backward
    for result in (r[layout] for r in by_rank for layout in LAYOUTS):
        stats = result["window-inside-shard"]
        assert sum(stats["sent"].values()) == 0 and sum(stats["received"].values()) == 0
    # rows whose keys the layout removes entirely give exactly 0 on every rank
    zero_rows = sum(int((torch.from_numpy(r[lay]["empty-rows"]["out"]).abs().amax((0, 2, 3)) == 0).sum())
                    for r in by_rank for lay in LAYOUTS)  # fmt: skip
    assert zero_rows > 0
    for result in (r["contiguous"] for r in by_rank):
        # plain dense ring: the whole shard (16 rows) goes each way
        assert result["no-pattern"]["sent"]["forward"] == 16 * _row_bytes("no-pattern")
        # a band of one block either side: only the boundary block (4 rows) crosses, each way
        assert result["sliding-window"]["sent"]["forward"] == 4 * _row_bytes("sliding-window")
        assert result["sliding-window"]["received"]["forward"] == 4 * _row_bytes("sliding-window")
        # backward: the same rows again, and their dK/dV (float64 here) back
        assert result["sliding-window"]["sent"]["backward"] == 8 * _row_bytes("sliding-window")


def test_four_ranks():
    names = ["local-window-causal", "random-dilated-gqa-pad", "strided-head-groups", "window-inside-shard"]
    by_rank = run_distributed(_run_rank, 4, names, LAYOUTS)
    for layout in LAYOUTS:
        _check_exact([r[layout] for r in by_rank], names, layout)
    for result in (r[layout] for r in by_rank for layout in LAYOUTS):
        stats = result["window-inside-shard"]
        assert sum(stats["sent"].values()) == 0 and sum(stats["received"].values()) == 0
    # windows of 6 tokens, shards of 10: only windows [6, 12) and [18, 24) cross a boundary,
    # so (causal) rank 0 sends rows 6..9 to rank 1 and rank 1 sends rows 18, 19 to rank 2
    sent = [r["contiguous"]["local-window-causal"]["sent"]["forward"] for r in by_rank]
    row = _row_bytes("local-window-causal")
    assert sent == [4 * row, 2 * row, 0, 0]
