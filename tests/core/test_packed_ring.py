"""Packed documents and sliding windows across the ring, in real gloo process groups.

One group of 4 processes runs everything (P = 4 on the world, P = 3 and P = 2 on
subgroups): every ring implementation on the packed and windowed conformance cases
(documents and windows crossing shards, contiguous and zigzag, output and gradients),
the bytes each rank sends against formulas, and the errors every rank raises when the
ranks disagree on ``cu_seqlens`` or ``window_size``.
"""

from __future__ import annotations

import warnings
import zlib

import pytest
import torch
import torch.distributed as dist

import ring_core
from distributed_helpers import host_reads, raised, run_distributed
from ring_core import RingDilatedAttention, hookimpl
from ring_core.kernels import MathKernel
from ring_core.testing import PACKED_CASES, TOLERANCES, fit_case, sharded_case_errors
from ring_core.windows import window_kwargs

LAYOUTS = ("contiguous", "zigzag")
WORLD = 4
B, H, D = 1, 4, 8  # shapes of the byte-count cases: N = 32, shards of 8
ELEMENT = 8  # float64

# implementation -> (constructor options, world sizes): every ring on the packed and windowed cases
RINGS = {
    "ring_dilated": ({}, (2, 3, 4)),
    "ring_dilated/native-window": ({"kernel": "native_window"}, (3,)),  # whole segments with their window
    "ring_dilated_flash": ({}, (2,)),
    "ring_dilated_production": ({}, (3,)),
    "block_sparse_ring_dilated": ({"block_size": 4}, (2,)),
    "ring_distributed_dilated/ring": ({"strategy": "ring"}, (4,)),
    "ring_distributed_dilated/ulysses": ({"strategy": "ulysses"}, (2,)),
    "ring_distributed_dilated/hybrid": ({"strategy": "hybrid", "ulysses_degree": 2}, (4,)),
    "ring_distributed_dilated/allgather": ({"strategy": "allgather"}, (2,)),
}


class NativeWindowKernel(MathKernel):
    """The math kernel declaring native windows (applied as a mask inside): the ring then hands it whole local
    segments and cross-shard blocks with their kernel window, instead of window tiles."""

    name = "native_window"
    priority = -100
    supports_window = True

    def forward(self, q, k, v, *, window=None, mask=None, **kwargs):
        return super().forward(q, k, v, **kwargs, **window_kwargs(MathKernel(), q, k, mask, window))

    def backward(self, dout, q, k, v, out, lse, *, window=None, mask=None, **kwargs):
        return super().backward(dout, q, k, v, out, lse, **kwargs, **window_kwargs(MathKernel(), q, k, mask, window))


class _Plugin:
    @hookimpl
    def register_kernels(self, register):
        register(NativeWindowKernel())


def _runs_here(options: dict, case, world_size: int) -> bool:
    """Ulysses degrees must divide both head counts."""
    u = world_size if options.get("strategy") == "ulysses" else options.get("ulysses_degree", 1)
    return case.heads % u == 0 and (case.kv_heads or case.heads) % u == 0


def _checks(rank, groups):
    rows = []
    for key, (options, sizes) in RINGS.items():
        name = key.split("/")[0]
        for world_size in sizes:
            if world_size not in groups:
                continue
            group, group_rank = groups[world_size]
            if group_rank is None:
                continue
            for case in PACKED_CASES:
                if not _runs_here(options, case, world_size):
                    continue
                for layout in LAYOUTS:
                    fitted = fit_case(case, world_size, layout)
                    module = ring_core.create_attention(
                        name, **fitted.config, **options, layout=layout, process_group=group
                    )
                    seed = zlib.crc32(f"{key}/{world_size}/{case.name}/{layout}".encode()) % 1000  # same on the group
                    errors = sharded_case_errors(module, fitted, group_rank, world_size, layout, seed=seed)
                    rows.append((key, world_size, case.name, layout, errors))
    return rows


def _inputs(n_local: int, rank: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed * 100 + rank)
    return [torch.randn(B, n_local, H, D, generator=generator, dtype=torch.float64) for _ in range(3)]


def _byte_counts(rank):
    """Forward/backward bytes and peers on the P = 4 world (N = 32, shards of 8, zigzag chunks of 4)."""
    configs = {  # name: (segments, rates, layout, causal, window, cu_seqlens)
        "window-causal": ([32], [1], "contiguous", True, (3, 0), None),
        "window-two-sided": ([32], [1], "contiguous", False, (3, 2), None),
        "window-causal-zigzag": ([32], [1], "zigzag", True, (3, 0), None),
        "window-dilated": ([16, 32], [1, 2], "contiguous", True, (4, -1), None),
        "documents-inside": ([32], [1], "contiguous", True, (-1, -1), [0, 8, 12, 16, 24, 32]),
        "documents-crossing": ([32], [1], "contiguous", True, (-1, -1), [0, 5, 13, 32]),
        "documents-window": ([32], [1], "contiguous", False, (2, 2), [0, 5, 13, 32]),
    }
    counts = {}
    for name, (segments, rates, layout, causal, window, documents) in configs.items():
        module = RingDilatedAttention(segments, rates, layout=layout, window_size=window)
        q, k, v = (x.requires_grad_() for x in _inputs(8, rank))
        options = {} if documents is None else {"cu_seqlens": torch.tensor(documents)}
        module(q, k, v, is_causal=causal, **options).sum().backward()
        stats = module.comm_stats
        counts[name] = (stats.forward_bytes, stats.backward_bytes, dict(stats.peer_bytes))
    return counts


def _errors(rank):
    """Ranks that disagree on cu_seqlens or window_size, or pass a bad cu_seqlens: every rank raises."""
    out = {}

    def call(window=(-1, -1), documents=(0, 12, 32), module=None):
        module = module or RingDilatedAttention([32], [1], window_size=window)
        return module(*_inputs(8, rank, seed=2), cu_seqlens=torch.tensor(documents))

    out["cu_seqlens"] = raised(lambda: call(documents=(0, 10, 32) if rank == 1 else (0, 12, 32)))
    out["window"] = raised(lambda: call(window=(4, 0) if rank == 2 else (3, 0)))
    out["bad_cu_seqlens"] = raised(lambda: call(documents=(1, 12, 32) if rank == 0 else (0, 12, 32)))
    out["not_global"] = raised(lambda: call(documents=(0, 8)))  # a shard's length, not N
    out["functional"] = raised(
        lambda: ring_core.ring_dilated_attention(
            *_inputs(8, rank), segment_lengths=[32], dilation_rates=[1], window_size=(2, 0) if rank else (3, 0)
        )
    )
    module = RingDilatedAttention([32], [1])
    out["after"] = bool(torch.isfinite(call(module=module)).all())
    # every call agrees across ranks, documents included: one all-gather per call, repeated batches too
    gathers = []
    original = dist.all_gather

    def counting(*args, **kwargs):
        gathers.append(1)
        return original(*args, **kwargs)

    dist.all_gather = counting
    try:
        for documents in ((0, 12, 32), (0, 12, 32), (0, 3, 32)):
            call(module=module, documents=documents)
    finally:
        dist.all_gather = original
    out["gathers"] = len(gathers)
    return out


def _world(rank, world_size):
    ring_core.get_registry().register_plugin(_Plugin(), "native-window-kernel")
    # the world first: the hybrid strategy makes its own subgroups of the same ranks as the pairs below
    checks = _checks(rank, {4: (None, rank)})
    pair = dist.new_group([0, 1]), dist.new_group([2, 3])
    three = dist.new_group([0, 1, 2])
    checks += _checks(rank, {3: (three, rank if rank < 3 else None), 2: (pair[rank // 2], rank % 2)})
    dist.barrier()
    return {"checks": checks, "bytes": _byte_counts(rank), "errors": _errors(rank)}


@pytest.fixture(scope="module")
def world():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return run_distributed(_world, WORLD, timeout=900)


@pytest.mark.distributed
@pytest.mark.parametrize("ring", sorted(RINGS))
def test_every_ring_matches_reference_rows(world, ring):
    """float64, every packed and windowed case, contiguous and zigzag, every P listed: out, dq, dk, dv."""
    limit_out, limit_grad = TOLERANCES[torch.float64]
    rows = [row for result in world for row in result["checks"] if row[0] == ring]
    options, sizes = RINGS[ring]
    ranks = {2: 4, 3: 3, 4: 4}  # P = 2 runs on both pairs of the world
    cases = sum(sum(_runs_here(options, case, p) for case in PACKED_CASES) * ranks[p] for p in sizes)
    assert len(rows) == cases * len(LAYOUTS) and rows
    for _, world_size, name, layout, errors in rows:
        assert errors["out"] <= limit_out, (ring, world_size, name, layout, errors)
        assert max(errors[g] for g in ("dq", "dk", "dv")) <= limit_grad, (ring, world_size, name, layout, errors)


def _kv_bytes(row_heads: int) -> int:
    return row_heads * B * 2 * D * ELEMENT  # k and v rows of one head


def _peers(sends: dict[int, set[int]], rank: int) -> set[int]:
    """Whom ``rank`` sends to over a call: K/V to ``sends[rank]``, then dK/dV back to the ranks that sent to it."""
    return sends[rank] | {source for source, targets in sends.items() if rank in targets}


@pytest.mark.distributed
def test_bytes_causal_window_sends_the_window_to_the_next_rank_only(world):
    """Window (3, 0), causal, contiguous: the first query of rank s + 1 reaches 3 keys back, so rank s sends
    its last 3 rows (all heads) to s + 1 and nothing else; backward fetches them again and returns the dK/dV
    of the 3 rows it received."""
    for rank, result in enumerate(world):
        forward, backward, peers = result["bytes"]["window-causal"]
        sent = 3 * H if rank < WORLD - 1 else 0
        received = 3 * H if rank > 0 else 0
        assert forward == _kv_bytes(sent)
        assert backward == _kv_bytes(sent) + _kv_bytes(received)
        expected = {rank + 1: 2 * _kv_bytes(sent)} if sent else {}  # K/V in forward and in backward
        if received:
            expected[rank - 1] = _kv_bytes(received)  # dK/dV of the rows it received
        assert peers == expected


@pytest.mark.distributed
def test_bytes_two_sided_window_sends_each_side_to_its_neighbour(world):
    """Window (3, 2), non-causal: rank s sends its last 3 rows to s + 1 and its first 2 rows to s - 1."""
    for rank, result in enumerate(world):
        forward, _, peers = result["bytes"]["window-two-sided"]
        expected = {}
        if rank < WORLD - 1:
            expected[rank + 1] = 3 * H
        if rank > 0:
            expected[rank - 1] = 2 * H
        assert forward == _kv_bytes(sum(expected.values()))
        assert set(peers) == set(expected)  # neighbours both ways: its dK/dV go back to the same ranks


@pytest.mark.distributed
def test_bytes_causal_window_zigzag_sends_to_the_owners_of_the_next_chunks(world):
    """Zigzag, chunks of 4 (rank r holds chunks r and 7 - r), window (3, 0): chunk c needs the last 3 rows of
    chunk c - 1. Rank 0 sends chunk 0's to rank 1; rank 1 chunk 1's to rank 2 and chunk 6's to rank 0; rank 2
    chunk 2's to rank 3 and chunk 5's to rank 1; rank 3 chunk 4's to rank 2 (chunk 3 -> 4 stays on rank 3)."""
    expected = {0: {1}, 1: {0, 2}, 2: {1, 3}, 3: {2}}
    for rank, result in enumerate(world):
        forward, _, peers = result["bytes"]["window-causal-zigzag"]
        assert forward == len(expected[rank]) * _kv_bytes(3 * H)
        assert set(peers) == _peers(expected, rank)


@pytest.mark.distributed
def test_bytes_dilated_window_sends_the_window_of_each_branch(world):
    """Segments [16, 32], rates [1, 2], window (4, -1) causal. Branch (16, 1): boundaries 8 and 24 are inside
    a segment: 4 rows x 4 heads. Branch (32, 2): 4 positions are 2 selected rows back, per offset (2 heads):
    2 x 2 x 2 row-heads at every boundary. Rank 1 -> 2 crosses only the second branch's segment."""
    expected = {0: 16 + 8, 1: 8, 2: 16 + 8, 3: 0}
    for rank, result in enumerate(world):
        forward, _, peers = result["bytes"]["window-dilated"]
        assert forward == _kv_bytes(expected[rank])
        assert set(peers) == _peers({r: {r + 1} if expected[r] else set() for r in expected}, rank)


@pytest.mark.distributed
def test_bytes_documents_inside_shards_send_nothing(world):
    for result in world:
        assert result["bytes"]["documents-inside"] == (0, 0, {})


@pytest.mark.distributed
def test_bytes_documents_crossing_shards_send_their_rows_to_their_ranks_only(world):
    """Documents [0, 5), [5, 13), [13, 32), causal: rank 0 sends rows 5..7 to rank 1; rank 1 rows 13..15 to
    ranks 2 and 3; rank 2 its 8 rows to rank 3. With a window (2, 2) instead (non-causal): rank 0 -> 1 rows
    6, 7; rank 1 -> 0 rows 8, 9; rank 1 -> 2 rows 14, 15; rank 2 -> 1 rows 16, 17; rank 2 -> 3 rows 22, 23;
    rank 3 -> 2 rows 24, 25."""
    crossing = {0: {1: 3}, 1: {2: 3, 3: 3}, 2: {3: 8}, 3: {}}
    windowed = {0: {1: 2}, 1: {0: 2, 2: 2}, 2: {1: 2, 3: 2}, 3: {2: 2}}
    for rank, result in enumerate(world):
        for name, expected in (("documents-crossing", crossing), ("documents-window", windowed)):
            forward, _, peers = result["bytes"][name]
            assert forward == _kv_bytes(H * sum(expected[rank].values())), (name, rank)
            assert set(peers) == _peers({r: set(sends) for r, sends in expected.items()}, rank), (name, rank)


@pytest.mark.distributed
def test_disagreeing_ranks_all_raise(world):
    errors = [result["errors"] for result in world]
    for scenario, words in {
        "cu_seqlens": ("cu_seqlens", "same tensor on every rank"),
        "window": ("window_size",),
        "functional": ("window_size",),
    }.items():
        for rank, result in enumerate(errors):
            assert result[scenario] is not None, f"rank {rank} did not raise for {scenario}"
            kind, message = result[scenario]
            assert kind == "RingConfigError", (scenario, rank, message)
            assert all(word in message for word in words), (scenario, rank, message)
    assert errors[0]["bad_cu_seqlens"] == ("ValueError", "cu_seqlens must start at 0, got [1, 12, 32]")
    for rank in range(1, WORLD):
        kind, message = errors[rank]["bad_cu_seqlens"]
        assert kind == "RingConfigError" and "rank(s) [0]" in message
    for result in errors:
        kind, message = result["not_global"]
        assert kind == "ValueError" and "cu_seqlens must end at N=32" in message
        assert result["after"] is True
        assert result["gathers"] == 3  # one small all-gather per call, never skipped for a repeated batch


# -- no processes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world", "layout", "segments", "rates", "causal", "window", "documents"),
    [
        (4, "zigzag", [64], [1], True, (40, 0), None),
        (4, "contiguous", [8, 64], [1, 2], False, (12, 30), (0, 5, 5, 33, 64)),
        (3, "contiguous", [6, 24], [1, 3], True, (-1, -1), (0, 2, 40, 48)),
        (2, "zigzag", [16, 64], [2, 4], False, (9, 9), (0, 17, 64)),
    ],
)
def test_send_bound_covers_packed_and_windowed_sends(world, layout, segments, rates, causal, window, documents):
    """Windows and documents only narrow what travels: each key row still goes at most once per branch, so no
    send exceeds the copy-engine slots' bound computed from the shapes."""
    from ring_core.dilated import branches
    from ring_core.ring_plan import _part_kv_heads as part_kv_heads
    from ring_core.ring_plan import _part_rows as part_rows
    from ring_core.ring_plan import build_ring_plan
    from ring_core.ring_schedule import send_bounds

    seq_len, kv_heads = 64 if world != 3 else 48, 2
    branch_list = tuple(branches(segments, rates, "lse", H))
    q = torch.zeros(B, seq_len // world, H, D)
    k = v = torch.zeros(B, seq_len // world, kv_heads, D)
    bound = send_bounds(q, k, v, len(branch_list))["send"]
    for rank in range(world):
        plan = build_ring_plan(
            seq_len, world, rank, layout, branch_list, H, kv_heads, causal, torch.device("cpu"),
            window=window, documents=documents,
        )  # fmt: skip
        for step in plan.steps:  # K and V of every (row, head), and one padding flag per row
            values = sum(part_rows(p) * part_kv_heads(p, kv_heads) * 2 * D for p in step.send.kv_parts)
            flags = sum(part_rows(p) for p in step.send.kv_parts)
            assert (values + flags) * k.element_size() <= bound


def _cu_seqlens_reads(rank, world_size):
    """How often each call reads this rank's ``cu_seqlens`` on the host (each read of a CUDA tensor waits for the
    GPU): forward and backward of a ring call with documents crossing the shards, twice (the second call gets a
    new tensor of other boundaries), and the same output and gradients as a call whose op reads them itself."""
    module = RingDilatedAttention([8, 16], [1, 2])
    results = []
    with host_reads() as reads:
        for documents in ((0, 5, 13, 16), (0, 9, 16)):
            cu_seqlens = torch.tensor(documents)
            cu_seqlens._counted = True
            q, k, v = (x.requires_grad_() for x in _inputs(8, rank, seed=3))
            before = len(reads)
            out = module(q, k, v, is_causal=True, cu_seqlens=cu_seqlens)
            out.sum().backward()
            results.append((len(reads) - before, out.detach(), [x.grad for x in (q, k, v)]))
    expected = []
    for documents in ((0, 5, 13, 16), (0, 9, 16)):
        q, k, v = (x.requires_grad_() for x in _inputs(8, rank, seed=3))
        out = module.run(
            q, k, v, causal=True, key_padding_mask=None, dropout_p=0.0,
            return_lse=False, cu_seqlens=torch.tensor(documents),
        )  # fmt: skip
        out.sum().backward()
        expected.append((out.detach(), [x.grad for x in (q, k, v)]))
    same = all(
        torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ga, gb))
        for (_, a, ga), (b, gb) in zip(results, expected)
    )
    return [count for count, _, _ in results], same


@pytest.mark.distributed
def test_ring_reads_cu_seqlens_once_per_call():
    """On several ranks the module reads ``cu_seqlens`` once, when every rank checks and agrees on it; the ops,
    forward and backward, reuse those values (the same results as an op that reads them itself)."""
    for counts, same in run_distributed(_cu_seqlens_reads, 2):
        assert counts == [1, 1], counts
        assert same
