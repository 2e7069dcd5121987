"""RingDilatedAttentionFlash in a real gloo group of 2 (P > 1 runs core's ring with this package's dispatch)."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_distributed
from ring_core.testing import QUICK_CASES, TOLERANCES, Case, fit_case, sharded_case_errors
from ring_flash import RingDilatedAttentionFlash

WORLD = 2


def _ring(rank, world_size):
    rows = []
    for case in QUICK_CASES:
        for layout in ("contiguous", "zigzag"):
            fitted = fit_case(case, world_size, layout)
            module = RingDilatedAttentionFlash(**fitted.config, layout=layout)
            errors = sharded_case_errors(module, fitted, rank, world_size, layout, seed=len(rows))
            rows.append((case.name, layout, errors))
    return rows


@pytest.mark.distributed
def test_ring_of_two_matches_reference_rows():
    limit_out, limit_grad = TOLERANCES[torch.float64]
    results = run_distributed(_ring, WORLD, timeout=300)
    assert all(len(rows) == 2 * len(QUICK_CASES) for rows in results)
    for rows in results:
        for name, layout, errors in rows:
            assert errors["out"] <= limit_out, (name, layout, errors)
            assert max(errors[g] for g in ("dq", "dk", "dv")) <= limit_grad, (name, layout, errors)


# Segments inside every shard (N=32 over 2 ranks: shards of 16, zigzag runs of 8): the ring sends nothing,
# so both modules run the single-device schedule on the shard (ring-flash: its fused path). The last case
# fits a contiguous shard but not a zigzag run, so it also takes the ring.
LOCAL_CASES = (
    Case("local-dilated-gqa-causal-pad", 32, 4, (4, 8), (1, 2), kv_heads=2, causal=True, padding=True),
    Case("local-head-groups", 32, 4, (4, 8), (1, 2), merge="head_groups", causal=True),
    Case("shard-sized-segment", 32, 4, (16,), (2,), causal=True),
)


def _local(rank, world_size):
    from ring_core import RingDilatedAttention

    rows = []
    for case in LOCAL_CASES:
        for layout in ("contiguous", "zigzag"):
            for cls in (RingDilatedAttention, RingDilatedAttentionFlash):
                module = cls(**case.config, layout=layout)
                errors = sharded_case_errors(module, case, rank, world_size, layout, seed=len(rows))
                rows.append((case.name, layout, cls.__name__, errors, module.comm_stats.total_bytes))
    return rows


@pytest.mark.distributed
def test_segments_inside_shards_run_locally_and_exactly():
    limit_out, limit_grad = TOLERANCES[torch.float64]
    for rows in run_distributed(_local, WORLD, timeout=300):
        assert len(rows) == 2 * 2 * len(LOCAL_CASES)
        for name, layout, cls, errors, sent in rows:
            assert errors["out"] <= limit_out, (name, layout, cls, errors)
            assert max(errors[g] for g in ("dq", "dk", "dv")) <= limit_grad, (name, layout, cls, errors)
            spans = name == "shard-sized-segment" and layout == "zigzag"
            assert (sent > 0) == spans, (name, layout, cls, sent)
