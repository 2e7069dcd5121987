"""Gathering a sequence's shards back into the full tensor on every rank: :func:`unshard_sequence`.

The ranks first agree (one small all-gather) that their shards have one shape and dtype: an
all-gather of unequal tensors would abort the process instead of raising.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
import torch.distributed as dist

from .agreement import RingConfigError, agree_across_ranks
from .comm import RingComm, RingCommStats
from .sharding import check_layout, group_rank_and_size, shard_sequence

__all__ = ["unshard_sequence"]


def _reorder_gathered(shards: list[torch.Tensor], layout: str, dim: int) -> torch.Tensor:
    world_size = len(shards)
    if layout == "contiguous" or world_size == 1:
        return torch.cat(shards, dim)
    halves = [s.chunk(2, dim) for s in shards]
    chunks = [halves[r][0] for r in range(world_size)] + [halves[r][1] for r in reversed(range(world_size))]
    return torch.cat(chunks, dim)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layout: str, group: Any, dim: int, world_size: int) -> torch.Tensor:
        ctx.layout, ctx.group, ctx.dim, ctx.world_size = layout, group, dim, world_size
        shards = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(shards, x.contiguous(), group=group)
        return _reorder_gathered(shards, layout, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        local = shard_sequence(grad, ctx.layout, ctx.group, ctx.dim)
        return local.contiguous(), None, None, None, None


def unshard_sequence(x: torch.Tensor, layout: str = "contiguous", group: Any = None, dim: int = 1) -> torch.Tensor:
    """Gather every rank's shard of ``dim`` into the full tensor (on every rank); differentiable.

    Backward sums the gradients of all ranks (every rank's loss counts), as
    ``torch.distributed.nn.all_gather`` does, and returns this rank's shard of the sum.
    """
    check_layout(layout)
    rank, world_size = group_rank_and_size(group)
    if world_size == 1:
        return x
    _agree_on_shards(x, layout, group, dim, rank, world_size)
    gathered: torch.Tensor = _Unshard.apply(x, layout, group, dim, world_size)  # type: ignore[no-untyped-call]
    return gathered


MAX_DIMS = 8


def _agree_on_shards(x: torch.Tensor, layout: str, group: Any, dim: int, rank: int, world_size: int) -> None:
    """Every rank's shard has one shape and dtype (else the all-gather would abort): the same error everywhere."""
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.int64, torch.int32)

    def check() -> list[int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"unshard_sequence: x must be a torch.Tensor, got {type(x).__name__}")
        if not -x.dim() <= dim < x.dim() or x.dim() > MAX_DIMS:
            raise ValueError(f"unshard_sequence: dim {dim} is out of range for a shard of shape {tuple(x.shape)}")
        if layout == "zigzag" and x.shape[dim] % 2 != 0:
            raise ValueError(f"layout='zigzag' needs an even local length along dim {dim}, got {x.shape[dim]}")
        code = dtypes.index(x.dtype) if x.dtype in dtypes else zlib.crc32(str(x.dtype).encode())
        return [1, x.dim(), code, *x.shape, *[0] * (MAX_DIMS - x.dim())]

    fields = ("ok", "dims", "dtype", *(f"size {i}" for i in range(MAX_DIMS)))
    comm = RingComm(group, rank, world_size, RingCommStats())
    table = agree_across_ranks(check, fields, comm, name="unshard_sequence", like=x)
    if len({tuple(row) for row in table}) > 1:
        shapes = ", ".join(f"rank {r}: {tuple(row[3 : 3 + row[1]])}" for r, row in enumerate(table))
        raise RingConfigError(
            f"unshard_sequence: every rank must pass a shard of the same shape and dtype, got {shapes}"
            + ("" if len({row[2] for row in table}) == 1 else " (and different dtypes)")
        )
