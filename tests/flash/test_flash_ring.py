"""RingDilatedAttentionFlash in a real gloo group of 2 (P > 1 runs core's ring with this package's dispatch)."""

from __future__ import annotations

import pytest
import torch

from distributed_helpers import run_distributed
from ring_core.testing import QUICK_CASES, TOLERANCES, fit_case, sharded_case_errors
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
