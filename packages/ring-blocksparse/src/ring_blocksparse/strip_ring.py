"""The strips across ranks: each rank's plan of calls per source shard, and the sparse ring that runs them.

Every rank computes the same plan for every pair of ranks (which key/value rows one sends the other),
so sends and receives match without talking. Each ring step runs the calls of
:mod:`ring_blocksparse.strided` against the source's shard, the received rows put back at their rows;
the backward runs each step's calls again instead of keeping their graphs, so memory stays one shard (their forward
again for autograd, or, where FlexAttention's backward operator is on, only their backward kernels on the final out
and lse: :mod:`ring_blocksparse.flex_backward`); it keeps only each forward step's per-call cuts (key padding, packed
documents: a few int32/bool values per row) and units so that the backward does not build them again.

Note (the steps' own passes over shard-sized tensors). When a rank receives every row of a source's
shard (most sparse layouts need every key tile somewhere), the received K|V buffer *is* that shard in
order: the calls read it directly, nothing is scattered, and the key gradients land straight in the
buffer that sends them back. Otherwise the received rows are scattered into a shard buffer, and their
gradients gathered from a shard-sized one. When the calls' key/value views of a source are disjoint (one
call per branch offset; key/value heads shared by several branches break this), each gradient element
is at most one call's: the calls write it (``copy_``) instead of adding it to zeros, and when they
also cover every received row on every key/value head nothing is zeroed first. Such an element is one
kernel's output, so it travels back in the inputs' dtype (bf16: half the bytes of the float32 that sums
need) with nothing lost, and flash-attn 4 writes it into the send buffer itself.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ring_core.plugin import Accumulator, BlockKernel, shard_positions

from .fa4 import fa4_backward, fa4_forward
from .flex import Cut, call_cuts, sparse_backward
from .flex_backward import call_backward
from .gather import BlockSparseSchedule, CommStats, _Posted
from .rows import gather_rows, scatter_rows
from .strided import StripCall, StripRun, backward_operator, fa4_blocks, sparse_forward, strip_calls, strip_units
from .strips import needed_rows

# A source rank's shard as a ring step sees it: K, V and (with a key padding mask) the padding.
_Shard = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass
class StripPlan:
    """One rank's ring: its calls per source rank and the rows that travel (in the source's row order)."""

    rank: int
    world_size: int
    shard_len: int
    calls: dict[int, list[StripCall]]
    recv_rows: dict[int, torch.Tensor]  # source -> rows of the source's shard this rank receives
    send_rows: dict[int, torch.Tensor]  # destination -> local rows sent
    recv_positions: dict[int, torch.Tensor]  # source -> global positions received (same order)
    whole: dict[int, bool] = field(default_factory=dict)  # source -> every row of its shard received, in order
    # source -> (the calls' key/value views are disjoint, they cover every received row on every kv head)
    key_views: dict[int, tuple[bool, bool]] = field(default_factory=dict)
    # destination -> its calls' views of this rank's rows are disjoint: their gradients return in the inputs'
    # dtype (the module Note); for sources, key_views[source][0] says the same of this rank's own calls
    returns_disjoint: dict[int, bool] = field(default_factory=dict)
    chunks: list[list[tuple[int, int]]] = field(default_factory=list)  # every rank's runs of positions [start, stop)
    send_positions: dict[int, torch.Tensor] = field(default_factory=dict)  # destination -> global positions sent

    def to(self, device: torch.device) -> StripPlan:
        self.recv_rows = {s: r.to(device) for s, r in self.recv_rows.items()}
        self.send_rows = {d: r.to(device) for d, r in self.send_rows.items()}
        return self


def build_strip_plan(
    *,
    seq_len: int,
    rank: int,
    world_size: int,
    layout_kind: str,
    q: torch.Tensor,
    num_kv_heads: int,
    documents: bool = False,
    **call_options: Any,
) -> StripPlan:
    """The plan of ``rank``: its calls against every shard, and which rows each pair of ranks exchanges.

    Every rank computes the same exchange for every pair, so sends and receives match without talking.
    """
    positions = [shard_positions(seq_len, r, world_size, layout_kind) for r in range(world_size)]
    # dense strips and per-mask kernel flags on one process only: a ring step's flags vary by step,
    # and each set would compile its own kernel
    options = dict(
        call_options, q=q, num_kv_heads=num_kv_heads, dense=world_size == 1, flags=world_size == 1, documents=documents
    )
    calls: dict[int, list[StripCall]] = {}
    recv_rows: dict[int, torch.Tensor] = {}
    send_rows: dict[int, torch.Tensor] = {}
    recv_positions: dict[int, torch.Tensor] = {}
    send_positions: dict[int, torch.Tensor] = {}
    whole: dict[int, bool] = {}
    key_views: dict[int, tuple[bool, bool]] = {}
    returns_disjoint: dict[int, bool] = {}
    for source in range(world_size):
        calls[source] = strip_calls(positions[rank], positions[source], **options)
        if source != rank:
            rows = needed_rows([(c.tiles, c.k) for c in calls[source]], len(positions[source]))
            recv_rows[source], recv_positions[source] = rows, positions[source][rows]
            whole[source] = rows.numel() == len(positions[source])
            disjoint, covering = disjoint_and_covering(calls[source], rows, len(positions[source]), num_kv_heads)
            # (with packed documents a call runs only for the documents it serves: no row is sure to be written)
            key_views[source] = disjoint, covering and not documents
            theirs = strip_calls(positions[source], positions[rank], **dict(options, masks=False))
            send_rows[source] = needed_rows([(c.tiles, c.k) for c in theirs], len(positions[rank]))
            send_positions[source] = positions[rank][send_rows[source]]
            returns_disjoint[source] = disjoint_and_covering(
                theirs, send_rows[source], len(positions[rank]), num_kv_heads
            )[0]
    plan = StripPlan(
        rank, world_size, len(positions[rank]), calls, recv_rows, send_rows, recv_positions, whole, key_views,
        returns_disjoint, [_runs(x) for x in positions], send_positions,
    )  # fmt: skip
    return plan.to(q.device)


def document_plan(plan: StripPlan, documents: Sequence[int]) -> StripPlan:
    """``plan`` for packed ``documents`` (``cu_seqlens`` values): of the plan's rows, only those whose document holds
    a query of the receiving rank travel (a key matches no query of another document), cut the same way on both
    sides of every pair. Host work on the plan's CPU positions; the cached plan is left as it was."""

    def cut(rows: torch.Tensor, positions: torch.Tensor, receiver: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``rows`` (at global ``positions``) whose document holds some position of ``receiver`` (whose runs of
        positions span the documents from the one holding their start to the one holding their end)."""
        keep = torch.zeros(positions.shape, dtype=torch.bool)
        for start, stop in plan.chunks[receiver]:
            first = documents[bisect.bisect_right(documents, start) - 1]
            keep |= (positions >= first) & (positions < documents[bisect.bisect_right(documents, stop - 1)])
        index = keep.nonzero().flatten()
        return rows[index.to(rows.device)], positions[index]

    recv = {source: cut(rows, plan.recv_positions[source], plan.rank) for source, rows in plan.recv_rows.items()}
    send = {dest: cut(rows, plan.send_positions[dest], dest) for dest, rows in plan.send_rows.items()}
    return dataclasses.replace(
        plan, recv_rows={s: r for s, (r, _) in recv.items()}, recv_positions={s: p for s, (_, p) in recv.items()},
        send_rows={d: r for d, (r, _) in send.items()}, send_positions={d: p for d, (_, p) in send.items()},
        whole={s: plan.whole[s] and recv[s][0].numel() == plan.recv_rows[s].numel() for s in recv},
    )  # fmt: skip


def _runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted ``positions`` as runs of consecutive ones, ``[start, stop)`` each."""
    breaks = ((positions.diff() != 1).nonzero().flatten() + 1).tolist()
    return [(int(positions[a]), int(positions[b - 1]) + 1) for a, b in zip([0, *breaks], [*breaks, len(positions)])]


def disjoint_and_covering(
    calls: Sequence[StripCall], rows: torch.Tensor, buffer_len: int, num_kv_heads: int
) -> tuple[bool, bool]:
    """Whether the calls' key/value views of a ``buffer_len``-row buffer are disjoint (each gradient element
    is at most one call's), and whether they also cover every one of ``rows`` on every key/value head."""
    count = torch.zeros(buffer_len, num_kv_heads, dtype=torch.int32)
    for call in calls:
        count[call.k.rows, call.kv if isinstance(call.kv, slice) else slice(None)] += 1
    disjoint = bool((count <= 1).all())
    return disjoint, disjoint and bool((count[rows] == 1).all())


class StripRingSchedule(BlockSparseSchedule):
    """The sparse ring with every step on the strip kernels: the rows received from a rank are put back at
    their rows of that rank's shard (a buffer read only where the block masks allow), so each step is
    the same calls as on one GPU; the backward runs each step's calls again (only their backward kernels, on
    the final out and lse, where the backward operator is on), keeping nothing from the forward (memory stays
    one shard)."""

    # The base class's exchanges read only what both plans have: rank, world_size, send_rows, recv_positions.
    plan: StripPlan  # type: ignore[assignment]

    def __init__(
        self,
        plan: StripPlan,
        kernel: BlockKernel,
        *,
        stats: CommStats | None = None,
        sparse: str = "auto",
        key_padding_mask: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
        calls: dict[int, list[StripCall]] | None = None,
        **comm_options: Any,
    ) -> None:
        """``comm_options``: ``group``, ``timeout`` and ``context`` of :class:`~ring_blocksparse.gather.BlockSparseSchedule`;
        ``key_padding_mask``: this rank's ``(B, n)`` (its rows travel with the key/value rows); ``documents``: the
        global ``cu_seqlens`` (int32, on the device) for a plan built for packed documents (each call cuts its
        tiles and segments per document; the plan is :func:`document_plan`'s for them), and ``calls`` the
        plan's calls that these documents need (:func:`~ring_blocksparse.strided.document_calls`)."""
        super().__init__(plan, kernel, kernel, key_padding_mask=key_padding_mask, stats=stats, **comm_options)  # type: ignore[arg-type]
        self.run = StripRun([], kernel, sparse, documents=documents)
        self.calls = plan.calls if calls is None else calls
        # source -> the forward step's units and their cuts (padding, packed documents), for its backward step
        self.steps: dict[int, tuple[list[Any], list[Cut | None]]] = {}

    def shard_buffers(self, k: torch.Tensor, v: torch.Tensor) -> _Shard:
        b, _, h, _ = k.shape
        shape = (b, self.plan.shard_len, h)
        # rows not received are never read where a block mask allows; as padding they also skip tiles
        pad = None if self.key_padding_mask is None else self.key_padding_mask.new_ones(b, self.plan.shard_len)
        return k.new_zeros(*shape, k.shape[-1]), v.new_zeros(*shape, v.shape[-1]), pad

    def place(
        self, source: int, k_buf: torch.Tensor, v_buf: torch.Tensor, pad: torch.Tensor | None, shard: _Shard | None
    ) -> _Shard:
        """The source's shard as this step sees it: received rows at their rows, the rest untouched (finite).
        A whole shard received is that shard already (``shard`` may then be None)."""
        if source == self.plan.rank or self.plan.whole[source]:
            return k_buf, v_buf, pad
        assert shard is not None, "place needs the shard buffers for a source whose rows are not all received"
        rows = self.plan.recv_rows[source]
        scatter_rows(shard[0], rows, k_buf)
        scatter_rows(shard[1], rows, v_buf)
        if pad is not None and shard[2] is not None:
            shard[2].index_copy_(1, rows, pad)
        return shard

    def needs_shard(self) -> bool:
        """Whether some source's rows are scattered into shard buffers (:meth:`place`)."""
        return not all(self.plan.whole.values())

    def forward_step(
        self,
        q: torch.Tensor,
        calls: list[StripCall],
        kb: torch.Tensor,
        vb: torch.Tensor,
        acc: Accumulator,
        pad: torch.Tensor | None = None,
    ) -> tuple[list[Any], list[Cut | None]]:
        """Merge the calls' parts into ``acc``; returns the units run and their cuts (for the backward step)."""
        units = strip_units(self.run, calls, q)
        cuts = call_cuts(units, pad, self.run.documents)
        for call, cut in zip(units, cuts):
            blocks = fa4_blocks(self.run, call, q)
            if blocks is not None:
                o, lse = fa4_forward(call, blocks, q, kb, vb, scale=self.kernel.scale)
            else:
                o, lse, _ = sparse_forward(self.run, call, q, kb, vb, grad=False, cut=cut)
                o = o.transpose(1, 2)
            self.kernel.backend.merge(call.q_view(acc.out), call.q_view(acc.lse), o, lse.transpose(1, 2))
        return units, cuts

    def backward_step(
        self,
        q: torch.Tensor,
        calls: list[StripCall],
        kb: torch.Tensor,
        vb: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        dq: torch.Tensor,
        dkb: torch.Tensor,
        dvb: torch.Tensor,
        pad: torch.Tensor | None = None,
        *,
        write_keys: bool = False,
        step: tuple[list[Any], list[Cut | None]] | None = None,
    ) -> None:
        """Add the calls' gradients to ``dq``, ``dkb``, ``dvb``; ``write_keys``: the calls' key/value views are
        disjoint and ``dkb``/``dvb`` hold nothing yet, so each call's key/value gradient is written there; ``step``:
        the forward step's units and cuts (:meth:`forward_step`), else made again."""
        accumulate = self.kernel.backend.accumulate
        put_keys = _write if write_keys else accumulate
        if step is None:
            units = strip_units(self.run, calls, q)
            step = units, call_cuts(units, pad, self.run.documents)
        units, cuts = step
        for call, cut in zip(units, cuts):
            blocks = fa4_blocks(self.run, call, q)
            dk_view, dv_view = call.kv_leaf(dkb), call.kv_leaf(dvb)
            if blocks is not None:
                # written in place where it can be: flash-attn 4 takes output views of its own dtype and heads (a
                # single call's; a batch's gradients come in flash-attn 4's own buffers and are copied)
                in_place = (
                    write_keys and isinstance(call, StripCall) and isinstance(call.kv, slice) and dkb.dtype == q.dtype
                )
                outputs = (dk_view, dv_view) if in_place else None
                bq, bk, bv = fa4_backward(
                    call, blocks, q, kb, vb, out, lse, dout, scale=self.kernel.scale, outputs=outputs
                )
            elif backward_operator(self.run, call, q):
                bq, bk, bv = call_backward(call, q, kb, vb, out, lse, dout, scale=self.kernel.scale, cut=cut)
            else:  # the call's forward again, for autograd's graph
                o, lse_call, leaves = sparse_forward(self.run, call, q, kb, vb, grad=True, cut=cut)
                bq, bk, bv = sparse_backward(call, o, lse_call, leaves, dout, out, lse)
            accumulate(call.q_view(dq), bq)
            if bk is not dk_view:  # (else written there already)
                put_keys(dk_view, bk)
                put_keys(dv_view, bv)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: Accumulator) -> None:
        self.stats.calls += 1
        shard = self.shard_buffers(k, v) if self.needs_shard() else None
        for source, k_buf, v_buf, pad in self._sources(k, v, "forward"):
            if k_buf is not None and v_buf is not None and self.calls[source]:
                kb, vb, pb = self.place(source, k_buf, v_buf, pad, shard)
                self.steps[source] = self.forward_step(q, self.calls[source], kb, vb, acc, pb)

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
        plan = self.plan
        dq, dk, dv = grads
        d = k.shape[-1]
        shard = self.shard_buffers(k, v) if self.needs_shard() else None
        returning: list[_Posted] = []
        for source, k_buf, v_buf, pad in self._sources(k, v, "backward"):
            dkv = None
            if source == plan.rank:
                step = self.steps.pop(source, None)
                self.backward_step(q, self.calls[source], k, v, out, lse, dout, dq, dk, dv, pad, step=step)
            elif k_buf is not None and v_buf is not None:
                dkv = self.grad_buffer(source, k_buf, v_buf, dk)
                self.remote_backward_step(source, q, k_buf, v_buf, pad, shard, out, lse, dout, dq, dkv)
            if source != plan.rank:
                dest = self._returning_rank(source)
                returning.append(self._post_grads(dkv, source, k if plan.returns_disjoint[dest] else dk, v.shape[-1]))
        for exchange, shape, rows in returning:
            received = exchange.wait()
            if received is not None:
                received = received.view(shape)
                if rows.numel() == dk.shape[1]:  # every row, in order
                    dk.add_(received[..., :d])
                    dv.add_(received[..., d:])
                else:
                    received = received.to(dk.dtype)
                    dk.index_add_(1, rows, received[..., :d])
                    dv.index_add_(1, rows, received[..., d:])

    def grad_buffer(self, source: int, k_buf: torch.Tensor, v_buf: torch.Tensor, dk: torch.Tensor) -> torch.Tensor:
        """The buffer ``(B, R, H, Dk + Dv)`` (contents undefined) that returns the key|value gradients of the rows
        received from ``source``: the inputs' dtype where this rank's calls' views of them are disjoint, else
        ``dk``'s (module Note)."""
        shape = (*k_buf.shape[:3], k_buf.shape[3] + v_buf.shape[3])
        like = k_buf if self.plan.key_views[source][0] else dk
        return self.comm.empty("grad", math.prod(shape), like).view(shape)

    def remote_backward_step(
        self,
        source: int,
        q: torch.Tensor,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        pad: torch.Tensor | None,
        shard: _Shard | None,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        dq: torch.Tensor,
        dkv: torch.Tensor,
    ) -> None:
        """A step of another rank's rows: ``dq`` added to, ``dkv`` (``(B, R, H, Dk + Dv)``, contents undefined; the
        inputs' dtype where the calls' key views are disjoint) filled with the received rows' key|value gradients
        (module Note: which buffers, written or added)."""
        plan, d = self.plan, k_buf.shape[-1]
        kb, vb, pb = self.place(source, k_buf, v_buf, pad, shard)
        disjoint, covering = plan.key_views[source]
        if plan.whole[source]:  # the gradients land where they are sent from
            dkb, dvb = dkv[..., :d], dkv[..., d:]
            if not covering:
                dkv.zero_()
        else:
            new = torch.empty_like if covering else torch.zeros_like
            dkb, dvb = new(kb, dtype=dkv.dtype), new(vb, dtype=dkv.dtype)
        step = self.steps.pop(source, None)
        self.backward_step(
            q, self.calls[source], kb, vb, out, lse, dout, dq, dkb, dvb, pb, write_keys=disjoint, step=step
        )
        if not plan.whole[source]:
            rows = plan.recv_rows[source]
            gather_rows(dkv[..., :d], dkb, rows)
            gather_rows(dkv[..., d:], dvb, rows)


def _write(target: torch.Tensor, grad: torch.Tensor) -> None:
    target.copy_(grad)
