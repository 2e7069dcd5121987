"""How often a block-sparse call reads ``cu_seqlens`` to the host: once, where the ranks check (and agree on) it;
the gather path's ops, forward and backward, reuse those values (each read of a CUDA tensor waits for the GPU).
Two calls with other boundaries each time, the module (one instance) and the functional form, on 2 gloo ranks
and on one process."""

from __future__ import annotations

import functools

import pytest
from tests.distributed_helpers import READ_CASES, assert_one_read_per_call, cu_seqlens_reads, run_distributed

from ring_blocksparse import BlockSparseRingDilatedAttention, block_sparse_dilated_attention

CONFIG = READ_CASES[0].config


def _reads(rank, world_size):
    attentions = {
        "module": BlockSparseRingDilatedAttention(**CONFIG, block_size=4),
        "functional": functools.partial(block_sparse_dilated_attention, **CONFIG, block_size=4),
    }
    return {name: cu_seqlens_reads(attention, READ_CASES, rank, world_size) for name, attention in attentions.items()}


@pytest.mark.distributed
def test_one_read_of_cu_seqlens_per_call_on_two_ranks():
    for by_name in run_distributed(_reads, 2):
        assert_one_read_per_call(by_name)


def test_one_read_of_cu_seqlens_per_call_on_one_process():
    assert_one_read_per_call(_reads(0, 1))
