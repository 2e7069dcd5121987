"""Sequence layouts (SPEC.md "Sequence parallelism") without processes; the gathered round trip with real
gloo processes is in test_ring.py (it shares that file's process group)."""

from __future__ import annotations

import pytest
import torch

from ring_core import shard_positions, shard_ranges, shard_sequence, unshard_sequence


def test_contiguous_ranges():
    assert [shard_ranges(12, r, 3, "contiguous") for r in range(3)] == [[(0, 4)], [(4, 8)], [(8, 12)]]


def test_zigzag_holds_chunks_r_and_2p_minus_1_minus_r():
    # N = 16, P = 4: chunks of 2; rank r holds chunks r and 7 - r; rank 3's chunks 3 and 4 are adjacent (merged)
    assert shard_ranges(16, 0, 4, "zigzag") == [(0, 2), (14, 16)]
    assert shard_ranges(16, 1, 4, "zigzag") == [(2, 4), (12, 14)]
    assert shard_ranges(16, 3, 4, "zigzag") == [(6, 10)]
    assert shard_positions(16, 2, 4, "zigzag").tolist() == [4, 5, 10, 11]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_partition_the_sequence(layout, world_size):
    n = 24
    positions = torch.cat([shard_positions(n, r, world_size, layout) for r in range(world_size)])
    assert sorted(positions.tolist()) == list(range(n))
    x = torch.arange(n).reshape(1, n, 1, 1).expand(2, n, 3, 1)
    for rank in range(world_size):
        shard = shard_sequence(x, layout, rank=rank, world_size=world_size)
        assert torch.equal(shard[0, :, 0, 0], shard_positions(n, rank, world_size, layout))


def test_shard_along_another_dim():
    x = torch.arange(12).reshape(3, 4)
    assert shard_sequence(x, "zigzag", dim=0, rank=0, world_size=1).tolist() == x.tolist()
    assert shard_sequence(x, "contiguous", dim=-1, rank=1, world_size=2).tolist() == [[2, 3], [6, 7], [10, 11]]


def test_single_process_is_identity():
    x = torch.randn(2, 5, 3, 4)
    assert shard_sequence(x, "zigzag") is x or torch.equal(shard_sequence(x, "zigzag"), x)
    assert unshard_sequence(x, "zigzag") is x


@pytest.mark.parametrize(
    ("n", "world_size", "layout", "message"),
    [
        (10, 4, "contiguous", r"N=10 is not a multiple of P=4"),
        (12, 4, "zigzag", r"layout='zigzag' needs N divisible by 2\*P: N=12 is not a multiple of 2\*4"),
    ],
)
def test_indivisible_lengths_are_clear_errors(n, world_size, layout, message):
    with pytest.raises(ValueError, match=message):
        shard_sequence(torch.zeros(1, n, 1, 1), layout, rank=0, world_size=world_size)


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"layout must be one of \['contiguous', 'zigzag'\], got 'striped'"):
        shard_ranges(8, 0, 2, "striped")


def test_process_group_without_torch_distributed():
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        shard_sequence(torch.zeros(1, 4), "contiguous", group=object())
