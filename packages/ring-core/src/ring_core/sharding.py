"""Sequence layouts for sequence parallelism (SPEC.md, "Sequence parallelism").

- ``"contiguous"``: rank ``r`` of ``P`` holds positions ``[r*N/P, (r+1)*N/P)``.
- ``"zigzag"``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks
  ``r`` and ``2P-1-r``, in that order (causal load balance).

:func:`shard_sequence` cuts a full tensor into this rank's shard
(:func:`ring_core.unshard.unshard_sequence` gathers the shards back).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "LAYOUTS",
    "check_divisible",
    "check_layout",
    "group_rank_and_size",
    "shard_positions",
    "shard_ranges",
    "shard_sequence",
]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def check_divisible(seq_len: int, world_size: int, layout: str) -> None:
    """``N % P == 0`` (and ``N % 2P == 0`` for zigzag when ``P > 1``), else a clear ``ValueError``."""
    check_layout(layout)
    if seq_len % world_size != 0:
        raise ValueError(
            f"the sequence length must be divisible by the world size: N={seq_len} is not a multiple of P={world_size}"
        )
    if layout == "zigzag" and world_size > 1 and seq_len % (2 * world_size) != 0:
        raise ValueError(f"layout='zigzag' needs N divisible by 2*P: N={seq_len} is not a multiple of 2*{world_size}")


def shard_ranges(seq_len: int, rank: int, world_size: int, layout: str) -> list[tuple[int, int]]:
    """The global ``[start, stop)`` ranges rank ``rank`` holds, in local order; adjacent ranges are merged."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    check_divisible(seq_len, world_size, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if layout == "contiguous" or world_size == 1:
        size = seq_len // world_size
        return [(rank * size, (rank + 1) * size)]
    chunk = seq_len // (2 * world_size)
    first, second = rank, 2 * world_size - 1 - rank
    if second == first + 1:
        return [(first * chunk, (second + 1) * chunk)]
    return [(first * chunk, (first + 1) * chunk), (second * chunk, (second + 1) * chunk)]


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str) -> torch.Tensor:
    """The global positions of a rank's shard, in local order (int64)."""
    return torch.cat([torch.arange(a, b) for a, b in shard_ranges(seq_len, rank, world_size, layout)])


def group_rank_and_size(group: Any = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        members = dist.get_process_group_ranks(group)
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of process_group (global ranks "
            f"{members}); call the attention only on the group's ranks"
        )
    return rank, dist.get_world_size(group)


def shard_sequence(
    x: torch.Tensor,
    layout: str = "contiguous",
    group: Any = None,
    dim: int = 1,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along ``dim`` (a copy when zigzag).

    ``rank`` / ``world_size`` override the process group's (e.g. to simulate ranks).
    """
    if rank is None or world_size is None:
        group_rank, group_size = group_rank_and_size(group)
        rank = group_rank if rank is None else rank
        world_size = group_size if world_size is None else world_size
    ranges = shard_ranges(x.shape[dim], rank, world_size, layout)
    pieces = [x.narrow(dim, a, b - a) for a, b in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
