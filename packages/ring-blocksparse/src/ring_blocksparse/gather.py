"""The gather path: allowed tiles gathered into dense blocks for any registered kernel, on one process or
as a sparse ring over a process group (a rank sends exactly the key/value rows some query tile of
the receiver needs, nothing at all when no tile needs them)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ring_core.plugin import (
    Accumulator,
    BlockKernel,
    BlockSchedule,
    Exchange,
    RingComm,
    RingCommStats,
    block_kernel,
    dropout_seed,
)

from .plan import CAUSAL, MASKED, Group, Plan
from .rows import add_rows, gather_rows, scatter_rows

_Shape = tuple[int, int, int, int]
# per ring step: (source rank, its K rows, V rows, padding rows; the buffers None when nothing comes from it)
_Source = tuple[int, "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]
_Posted = tuple[Exchange, _Shape, torch.Tensor]  # an exchange of dK|dV, its shape and the rows it is for


@dataclass(repr=False)
class CommStats(RingCommStats):
    """Bytes of key/value rows (and their gradients) this rank sent and received.

    A :class:`~ring_core.RingCommStats` (``forward_bytes``, ``backward_bytes``, ``total_bytes``,
    ``peer_bytes`` count what was sent; they accumulate over the calls that share these stats)
    that also counts what was received; :attr:`sent` and :attr:`received` give both per phase.
    """

    received: dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})

    @property
    def sent(self) -> dict[str, int]:
        return {"forward": self.forward_bytes, "backward": self.backward_bytes}

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())

    def reset(self) -> None:
        super().reset()
        self.received = {"forward": 0, "backward": 0}

    def __repr__(self) -> str:
        return f"CommStats(sent={self.sent}, received={self.received})"


def _select_rows(view: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``view.index_select(1, rows)`` of a ``(B, N, h, D)`` view; on CUDA one pass per row
    (:mod:`ring_blocksparse.rows`), not an index computed per element."""
    if not view.is_cuda:
        return view.index_select(1, rows)
    selected = view.new_empty(view.shape[0], rows.numel(), *view.shape[2:])
    gather_rows(selected, view, rows)
    return selected


def _gather_rows(x: torch.Tensor, heads: slice | torch.Tensor, rows: torch.Tensor, groups: int) -> torch.Tensor:
    """``x[:, rows, heads]`` as ``(B*G, rows/G, h, D)``."""
    if isinstance(heads, slice):
        y = _select_rows(x[:, :, heads], rows)
    else:
        y = x.index_select(1, rows).index_select(2, heads)
    return y.reshape(x.shape[0] * groups, -1, y.shape[2], y.shape[3])


def _add_rows(target: torch.Tensor, heads: slice | torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
    """``target[:, rows, heads] += grad`` (``grad``: ``(B, G, rows/G, h, D)``), repeated rows accumulated."""
    b = target.shape[0]
    grad = grad.reshape(b, rows.numel(), grad.shape[-2], grad.shape[-1])
    if isinstance(heads, slice):
        add_rows(target[:, :, heads], rows, grad)
    else:
        grad = grad.to(target.dtype)
        index = (torch.arange(b, device=rows.device)[:, None, None], rows[None, :, None], heads[None, None, :])
        target.index_put_(index, grad, accumulate=True)


def _kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    padded: bool,
    dropout_p: float,
    scale: float,
    kernel: str | None,
    seed: int | None = None,
) -> tuple[BlockKernel, BlockKernel]:
    """The kernel for unmasked tiles (and causal diagonal tiles) and the one for masked tiles (one dropout seed)."""
    if seed is None:
        seed = dropout_seed() if dropout_p > 0 else 0  # one seed: both kernels' blocks are one call's
    full, masked = (
        block_kernel(
            q, k, causal=causal, has_mask=has_mask, dropout_p=dropout_p, softmax_scale=scale, kernel=kernel, seed=seed
        )
        for has_mask in (padded, True)
    )
    return full, masked


class BlockSparseSchedule(BlockSchedule):
    """Runs a :class:`Plan`: local tiles first, then each source rank's rows as they arrive."""

    def __init__(
        self,
        plan: Plan,
        kernel: BlockKernel,
        masked_kernel: BlockKernel,
        *,
        key_padding_mask: torch.Tensor | None,
        group: Any = None,
        stats: CommStats | None = None,
        timeout: float | None = None,
        context: str = "",
    ) -> None:
        """``plan.backward_groups`` (batched by key tile) serve the backward when present and
        there is no dropout (dropout masks follow the forward's batching). ``timeout`` bounds
        every wait for a peer (``CollectiveError`` naming ``context``, the exchange and peers)."""
        self.plan = plan
        self.kernel, self.masked_kernel = kernel, masked_kernel
        self.key_padding_mask = key_padding_mask
        self.group = group
        self.stats = stats or CommStats()
        self.comm = RingComm(group, plan.rank, plan.world_size, self.stats, timeout=timeout, context=context)

    # -- communication -----------------------------------------------------------
    def _exchange(
        self, phase: str, send: torch.Tensor | None, send_to: int, recv_numel: int, recv_from: int, like: torch.Tensor
    ) -> Exchange:
        """:meth:`RingComm.exchange` in ``phase`` (bytes accumulate, never reset), counting the received bytes too."""
        self.comm.begin(phase, reset=False)
        exchange = self.comm.exchange(send, send_to, recv_numel, recv_from, like)
        if exchange.recv is not None:
            self.stats.received[phase] += exchange.recv.numel() * exchange.recv.element_size()
        return exchange

    def _sources(self, k: torch.Tensor, v: torch.Tensor, phase: str) -> Iterator[_Source]:
        """Yield ``(source, k_buf, v_buf, padding_buf)`` per ring step (buffers ``None`` when
        nothing comes from that rank), prefetching the next step's rows while this one computes."""
        plan = self.plan
        world = plan.world_size
        pending = self._post_kv(k, v, 1, phase) if world > 1 else None
        yield plan.rank, k, v, self.key_padding_mask
        for step in range(1, world):
            assert pending is not None  # (posted for every step)
            source, shape, kv_exchange, pad_exchange = pending
            kv = kv_exchange.wait()
            pad = None if pad_exchange is None else pad_exchange.wait()
            pending = self._post_kv(k, v, step + 1, phase) if step + 1 < world else None
            if kv is None:
                yield source, None, None, None
            else:
                d = k.shape[-1]
                kv = kv.view(shape)
                yield source, kv[..., :d], kv[..., d:], None if pad is None else pad.view(shape[:2]).bool()

    def _post_kv(
        self, k: torch.Tensor, v: torch.Tensor, step: int, phase: str
    ) -> tuple[int, _Shape, Exchange, Exchange | None]:
        """Post this step's rows: K|V (one flat buffer) and, with padding, the uint8 padding flags (a second one)."""
        plan = self.plan
        source, dest = (plan.rank - step) % plan.world_size, (plan.rank + step) % plan.world_size
        pad = self.key_padding_mask
        rows = plan.send_rows[dest]
        send: torch.Tensor | None = None
        pad_send: torch.Tensor | None = None
        if rows.numel():
            send = torch.cat([k.index_select(1, rows), v.index_select(1, rows)], -1).view(-1)
            if pad is not None:
                pad_send = pad.index_select(1, rows).to(torch.uint8).view(-1)
        b, _, h, d = k.shape
        shape = (b, plan.recv_positions[source].numel(), h, d + v.shape[-1])
        kv_exchange = self._exchange(phase, send, dest, math.prod(shape), source, k)
        pad_exchange = None
        if pad is not None:
            flags = torch.empty(0, dtype=torch.uint8, device=k.device)
            pad_exchange = self._exchange(phase, pad_send, dest, math.prod(shape[:2]), source, flags)
        return source, shape, kv_exchange, pad_exchange

    # -- per group -----------------------------------------------------------------
    def _call_args(self, g: Group, pad: torch.Tensor | None, b: int) -> tuple[BlockKernel, dict[str, Any]]:
        groups, _, kk = g.shape
        mask = None
        if pad is not None:
            mask = ~pad.index_select(1, g.k_rows).view(b, groups, 1, 1, kk)
        if g.mask is not None:
            mask = g.mask.expand(b, *g.mask.shape) if mask is None else g.mask[None] & mask
        if mask is not None:
            mask = mask.reshape(b * groups, *mask.shape[2:])
        kernel = self.masked_kernel if g.category == MASKED else self.kernel
        return kernel, {"causal": g.category == CAUSAL, "mask": mask, "block_id": g.block_id}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: Accumulator) -> None:
        """Merge the allowed (query tile, key tile) blocks into ``acc``, gathered per group of tiles.

        ``q``, ``k``, ``v``: this rank's ``(B, n, H, D)`` shards.
        """
        b = q.shape[0]
        self.stats.calls += 1
        if b == 0:  # nothing to compute or send (the ranks agreed on the batch size)
            return
        for source, k_buf, v_buf, pad in self._sources(k, v, "forward"):
            if k_buf is None or v_buf is None:  # nothing from that rank
                continue
            for g in self.plan.groups[source]:
                groups, tq, _ = g.shape
                kernel, args = self._call_args(g, pad, b)
                out, lse = kernel.backend.forward(
                    _gather_rows(q, g.heads, g.q_rows, groups),
                    _gather_rows(k_buf, g.kv_heads, g.k_rows, groups),
                    _gather_rows(v_buf, g.kv_heads, g.k_rows, groups),
                    scale=kernel.scale, causal=args["causal"], mask=args["mask"],
                    dropout_p=kernel.dropout_p, seed=kernel.seed + g.block_id,
                )  # fmt: skip
                h = out.shape[2]
                rows = g.q_rows[: g.real * tq]  # padded entries are dropped here
                out = out.unflatten(0, (b, groups))[:, : g.real].reshape(b, -1, h, out.shape[-1])
                lse = lse.unflatten(0, (b, groups))[:, : g.real].transpose(2, 3).reshape(b, -1, h)
                out_rows = _select_rows(acc.out[:, :, g.heads], rows)
                lse_rows = acc.lse[:, :, g.heads].index_select(1, rows)
                kernel.backend.merge(out_rows, lse_rows, out, lse)
                scatter_rows(acc.out[:, :, g.heads], rows, out_rows)
                acc.lse[:, :, g.heads].index_copy_(1, rows, lse_rows)

    def backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        plan, b = self.plan, q.shape[0]
        if b == 0:
            return
        dq, dk, dv = grads
        d = k.shape[-1]
        returning: list[_Posted] = []
        table = plan.groups
        if plan.backward_groups is not None and self.kernel.dropout_p == 0:
            table = plan.backward_groups
        for source, k_buf, v_buf, pad in self._sources(k, v, "backward"):
            dkv = None
            if source == plan.rank:
                dk_buf, dv_buf = dk, dv
            elif k_buf is not None and v_buf is not None:
                shape = (*k_buf.shape[:3], d + v_buf.shape[3])
                dkv = self.comm.empty("grad", math.prod(shape), dk).zero_().view(shape)
                dk_buf, dv_buf = dkv[..., :d], dkv[..., d:]
            if k_buf is not None and v_buf is not None:  # (else nothing came from that rank)
                for g in table[source]:
                    groups = g.shape[0]
                    kernel, args = self._call_args(g, pad, b)
                    lse_rows = lse[:, :, g.heads].index_select(1, g.q_rows)
                    block_dq, block_dk, block_dv = kernel.backward(
                        _gather_rows(dout, g.heads, g.q_rows, groups),
                        _gather_rows(q, g.heads, g.q_rows, groups),
                        _gather_rows(k_buf, g.kv_heads, g.k_rows, groups),
                        _gather_rows(v_buf, g.kv_heads, g.k_rows, groups),
                        _gather_rows(out, g.heads, g.q_rows, groups),
                        lse_rows.reshape(b * groups, -1, lse_rows.shape[-1]),
                        **args,
                    )
                    real, tq, kk = g.real, g.shape[1], g.shape[2]  # padded entries are dropped here
                    _add_rows(dq, g.heads, g.q_rows[: real * tq], block_dq.unflatten(0, (b, groups))[:, :real])
                    _add_rows(dk_buf, g.kv_heads, g.k_rows[: real * kk], block_dk.unflatten(0, (b, groups))[:, :real])
                    _add_rows(dv_buf, g.kv_heads, g.k_rows[: real * kk], block_dv.unflatten(0, (b, groups))[:, :real])
            if source != plan.rank:
                returning.append(self._post_grads(dkv, source, dk, v.shape[-1]))
        for exchange, shape, rows in returning:
            received = exchange.wait()
            if received is not None:
                received = received.view(shape)
                dk.index_add_(1, rows, received[..., :d])
                dv.index_add_(1, rows, received[..., d:])

    def _returning_rank(self, source: int) -> int:
        """The rank that got our rows at the step that brought ``source``'s: it returns their gradients then."""
        return (2 * self.plan.rank - source) % self.plan.world_size

    def _post_grads(self, dkv: torch.Tensor | None, source: int, dk: torch.Tensor, value_dim: int) -> _Posted:
        """Send the gradients of ``source``'s rows back; receive ours (``dk``'s shape and dtype) from the rank we
        sent rows to."""
        plan = self.plan
        dest = self._returning_rank(source)
        rows = plan.send_rows[dest]
        shape = (dk.shape[0], rows.numel(), dk.shape[2], dk.shape[3] + value_dim)
        send = None if dkv is None else dkv.view(-1)
        return self._exchange("backward", send, source, math.prod(shape), dest, dk), shape, rows
