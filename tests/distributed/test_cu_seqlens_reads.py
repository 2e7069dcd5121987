"""How often a call reads ``cu_seqlens`` to the host: once, where the ranks check (and agree on) it; the ops,
forward and backward, reuse those values (each read of a CUDA tensor waits for the GPU). Two calls on one module
with other boundaries each time, every strategy that runs on 2 gloo ranks, and on one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distributed_helpers import cu_seqlens_reads, run_distributed
from ring_core.testing import PACKED_CASES, TOLERANCES, packed_documents, within_tolerance
from ring_distributed import RingDilatedAttentionProduction, RingDistributedDilatedAttention

CASE = next(case for case in PACKED_CASES if case.name == "packed-window-dilated-causal-gqa")
CASES = (CASE, dataclasses.replace(CASE, documents=packed_documents(CASE.seq_len, 4, 9)))

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
        name: cu_seqlens_reads(cls(**CASE.config, **options), CASES, rank, world_size)
        for name, (cls, options) in MODULES.items()
    }


def _check(by_name):
    for name, results in by_name.items():
        assert [count for count, _ in results] == [1, 1], (name, results)
        assert all(within_tolerance(errors, TOLERANCES[torch.float64]) for _, errors in results), (name, results)


@pytest.mark.distributed
def test_one_read_of_cu_seqlens_per_call_on_two_ranks():
    for by_name in run_distributed(_reads, 2):
        _check(by_name)


def test_one_read_of_cu_seqlens_per_call_on_one_process():
    _check(_reads(0, 1))
