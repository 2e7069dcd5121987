"""How often a call reads ``cu_seqlens`` to the host: once, where the ranks check (and agree on) it; the ops,
forward and backward, reuse those values (each read of a CUDA tensor waits for the GPU). Two calls on one module
with other boundaries each time, every strategy that runs on 2 gloo ranks, and on one process."""

from __future__ import annotations

import pytest

from distributed_helpers import READ_CASES, assert_one_read_per_call, cu_seqlens_reads, run_distributed
from ring_distributed import RingDilatedAttentionProduction, RingDistributedDilatedAttention

# name -> (class, constructor options)
MODULES = {
    "ring": (RingDistributedDilatedAttention, {"strategy": "ring"}),
    "ulysses": (RingDistributedDilatedAttention, {"strategy": "ulysses"}),
    "allgather": (RingDistributedDilatedAttention, {"strategy": "allgather"}),
    "production": (RingDilatedAttentionProduction, {}),
    "production/checkpoint": (RingDilatedAttentionProduction, {"checkpoint": True}),
    "production/deterministic": (RingDilatedAttentionProduction, {"deterministic": True}),
}


def _reads(rank, world_size):
    return {
        name: cu_seqlens_reads(cls(**READ_CASES[0].config, **options), READ_CASES, rank, world_size)
        for name, (cls, options) in MODULES.items()
    }


@pytest.mark.distributed
def test_one_read_of_cu_seqlens_per_call_on_two_ranks():
    for by_name in run_distributed(_reads, 2):
        assert_one_read_per_call(by_name)


def test_one_read_of_cu_seqlens_per_call_on_one_process():
    assert_one_read_per_call(_reads(0, 1))
