"""Collectives of the 2-D mesh: Ulysses all-to-all, K/V all-gather, timed waits, reusable buffers.

Every collective is posted asynchronously and waited with an optional timeout, so a
stalled or dead peer becomes a :class:`CollectiveError` naming the operation instead
of a hang. The all-to-alls and the all-gather are autograd functions (their backward
is the opposite collective).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ring_core.plugin import CollectiveError, RingComm, RingCommStats, timed_wait

__all__ = [
    "BufferPool",
    "CollectiveError",
    "GatherShards",
    "HeadsToSeq",
    "ManagedComm",
    "SeqToHeads",
    "gather_mask",
    "timed_wait",
]


# -- Ulysses: sequence shard <-> head shard ----------------------------------------------------------


def _to_ring_order(chunks: torch.Tensor, layout: str) -> torch.Tensor:
    """``(u, B, n, ...)`` shards of the group's ranks -> ``(B, u*n, ...)`` in the ring shard's order.

    Contiguous: the shards follow each other. Zigzag: the group's first halves in rank
    order, then its second halves in reverse rank order (the ring-level zigzag shard).
    """
    u, b, n = chunks.shape[:3]
    x = chunks.movedim(0, 1)  # (B, u, n, ...)
    if layout == "zigzag" and u > 1:
        halves = x.unflatten(2, (2, n // 2))
        x = torch.cat([halves[:, :, 0], halves[:, :, 1].flip(1)], dim=1)
    return x.reshape(b, u * n, *chunks.shape[3:])


def _from_ring_order(x: torch.Tensor, u: int, layout: str) -> torch.Tensor:
    """Inverse of :func:`_to_ring_order`: ``(B, u*n, ...)`` -> ``(u, B, n, ...)``."""
    n = x.shape[1] // u
    y: torch.Tensor  # (Tensor.unflatten is untyped)
    if layout == "zigzag" and u > 1:
        y = x.unflatten(1, (2 * u, n // 2))
        y = torch.stack([y[:, :u], y[:, u:].flip(1)], dim=2).flatten(2, 3)  # (B, u, n, ...)
    else:
        y = x.unflatten(1, (u, n))
    return y.movedim(1, 0)


def _all_to_all(send: torch.Tensor, group: Any, timeout: float | None, what: str) -> torch.Tensor:
    recv = torch.empty_like(send)
    timed_wait(dist.all_to_all_single(recv, send, group=group, async_op=True), timeout, what)
    return recv


def seq_to_heads_forward(x: torch.Tensor, group: Any, u: int, layout: str, timeout: float | None) -> torch.Tensor:
    b, n, h, d = x.shape
    send = x.reshape(b, n, u, h // u, d).permute(2, 0, 1, 3, 4).contiguous()  # chunk s -> rank s
    recv = _all_to_all(send, group, timeout, "Ulysses all-to-all (sequence -> heads)")
    return _to_ring_order(recv, layout)


def heads_to_seq_forward(y: torch.Tensor, group: Any, u: int, layout: str, timeout: float | None) -> torch.Tensor:
    b, m, hl, d = y.shape
    send = _from_ring_order(y, u, layout).contiguous()  # chunk s: rank s's positions
    recv = _all_to_all(send, group, timeout, "Ulysses all-to-all (heads -> sequence)")  # chunk s: head chunk s
    return recv.permute(1, 2, 0, 3, 4).reshape(b, m // u, u * hl, d)


class SeqToHeads(torch.autograd.Function):
    """``(B, N/P, H, D)`` shards of a Ulysses group -> ``(B, u*N/P, H/u, D)``: all positions, a head chunk."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, u: int, layout: str, timeout: float | None) -> torch.Tensor:
        """``x`` ``(B, N/P, H, D)`` -> ``(B, u*N/P, H/u, D)``; ``timeout`` bounds the all-to-all (seconds or None)."""
        ctx.args = (group, u, layout, timeout)
        return seq_to_heads_forward(x, group, u, layout, timeout)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        return heads_to_seq_forward(grad.contiguous(), *ctx.args), None, None, None, None


class HeadsToSeq(torch.autograd.Function):
    """Inverse of :class:`SeqToHeads`."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, group: Any, u: int, layout: str, timeout: float | None) -> torch.Tensor:
        """``y`` ``(B, u*N/P, H/u, D)`` -> ``(B, N/P, H, D)``; ``timeout`` bounds the all-to-all (seconds or None)."""
        ctx.args = (group, u, layout, timeout)
        return heads_to_seq_forward(y, group, u, layout, timeout)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        return seq_to_heads_forward(grad.contiguous(), *ctx.args), None, None, None, None


def gather_mask(mask: torch.Tensor, group: Any, size: int, layout: str | None, timeout: float | None) -> torch.Tensor:
    """The group's ``(B, n)`` padding masks as one ``(B, size*n)`` mask (ring order, or rank order if no layout)."""
    flat = mask.to(torch.uint8).contiguous()
    parts = [torch.empty_like(flat) for _ in range(size)]
    timed_wait(dist.all_gather(parts, flat, group=group, async_op=True), timeout, "all-gather of the padding mask")
    stacked = torch.stack(parts)
    if layout is None:
        return stacked.movedim(0, 1).flatten(1, 2).bool()
    return _to_ring_order(stacked, layout).bool()


# -- all-gather of K/V shards (the "allgather" strategy) ----------------------------------------------


class GatherShards(torch.autograd.Function):
    """Concatenate the group's ``(B, n, ...)`` shards in rank order; backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, size: int, timeout: float | None) -> torch.Tensor:
        """``x`` ``(B, n, ...)`` of each of the ``size`` ranks -> ``(B, size*n, ...)`` in rank order."""
        ctx.args = (group, size, timeout)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        timed_wait(dist.all_gather(parts, x, group=group, async_op=True), timeout, "all-gather of K/V")
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        group, size, timeout = ctx.args
        chunks = [c.contiguous() for c in grad.chunk(size, dim=1)]
        out = torch.empty_like(chunks[0])
        timed_wait(dist.reduce_scatter(out, chunks, group=group, async_op=True), timeout, "reduce-scatter of dK/dV")
        return out, None, None, None


# -- ring P2P with timeouts and reused buffers --------------------------------------------------------


class BufferPool:
    """Communication buffers allocated once per (use, shape, dtype, device) and reused on every call."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[object, ...], torch.Tensor] = {}
        self.allocations = 0

    def get(self, key: tuple[object, ...], numel: int, like: torch.Tensor) -> torch.Tensor:
        full = (*key, numel, like.dtype, like.device)
        buffer = self.buffers.get(full)
        if buffer is None:
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.buffers[full] = buffer
            self.allocations += 1
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class ManagedComm(RingComm):
    """The ring's communicator with (optionally) pooled buffers; waits are timed by :class:`RingComm`'s ``timeout``.

    Buffer ``c`` of a phase is the ``c``-th exchange of that phase, so a buffer is only
    reused by the next call (never while a step of this call may still read it).
    """

    def __init__(
        self,
        group: Any,
        rank: int,
        world_size: int,
        stats: RingCommStats,
        *,
        timeout: float | None = None,
        pool: BufferPool | None = None,
        context: str = "",
    ) -> None:
        super().__init__(group, rank, world_size, stats, timeout=timeout, context=context)
        self.pool = pool

    def empty(self, use: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return super().empty(use, numel, like)
        return self.pool.get((self.phase, use, self.exchanges), numel, like)
