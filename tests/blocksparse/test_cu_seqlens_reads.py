"""How often a block-sparse call reads ``cu_seqlens`` to the host: once, where the ranks check (and agree on) it;
the gather path's ops, forward and backward, reuse those values (each read of a CUDA tensor waits for the GPU).
Two calls with other boundaries each time, the module (one instance) and the functional form, on 2 gloo ranks
and on one process."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from tests.distributed_helpers import cu_seqlens_reads, run_distributed

from ring_blocksparse import BlockSparseRingDilatedAttention, block_sparse_dilated_attention
from ring_core.testing import PACKED_CASES, TOLERANCES, packed_documents, within_tolerance

CASE = next(case for case in PACKED_CASES if case.name == "packed-window-dilated-causal-gqa")
CASES = (CASE, dataclasses.replace(CASE, documents=packed_documents(CASE.seq_len, 4, 9)))


def _reads(rank, world_size):
    attentions = {
        "module": BlockSparseRingDilatedAttention(**CASE.config, block_size=4),
        "functional": functools.partial(block_sparse_dilated_attention, **CASE.config, block_size=4),
    }
    return {name: cu_seqlens_reads(attention, CASES, rank, world_size) for name, attention in attentions.items()}


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
