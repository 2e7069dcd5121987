"""Block-sparse dilated attention, on one device or as a sparse ring over a process group.

A key is allowed iff the dilated branches allow it (counted as in SPEC.md) **and** the
block layout does; the softmax runs over the allowed keys through the engine's LSE
merge. Empty (query tile, key tile) pairs are never computed, and across ranks a rank
sends exactly the key/value rows some query tile of the receiver needs (nothing at all
when no tile needs them).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ring_core import select_kernel
from ring_core.dilated import branches
from ring_core.engine import Accumulator, BlockKernel, BlockSchedule, blockwise_attention
from ring_core.kernels import KernelRequest, default_scale
from ring_core.ring import Exchange, RingComm, RingCommStats
from ring_core.sharding import check_divisible, check_layout, group_rank_and_size
from ring_core.validation import check_dilated_config, check_dropout, check_qkv

from .flex import build_block_mask, check_kernel_options, flex_block_sparse, flex_reasons, kernel_options_for
from .patterns import Pattern, build_pattern, check_block_layout, check_block_size
from .plan import CAUSAL, MASKED, Group, Plan, build_plan

METHODS = ("auto", "gather", "flex")


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


def _gather_rows(x: torch.Tensor, heads: slice | torch.Tensor, rows: torch.Tensor, groups: int) -> torch.Tensor:
    """``x[:, rows, heads]`` as ``(B*G, rows/G, h, D)``."""
    if isinstance(heads, slice):
        y = x[:, :, heads].index_select(1, rows)
    else:
        y = x.index_select(1, rows).index_select(2, heads)
    return y.reshape(x.shape[0] * groups, -1, y.shape[2], y.shape[3])


def _add_rows(target: torch.Tensor, heads: slice | torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
    """``target[:, rows, heads] += grad`` (``grad``: ``(B, G, rows/G, h, D)``), repeated rows accumulated."""
    b = target.shape[0]
    grad = grad.reshape(b, rows.numel(), grad.shape[-2], grad.shape[-1]).to(target.dtype)
    if isinstance(heads, slice):
        target[:, :, heads].index_add_(1, rows, grad)
    else:
        index = (torch.arange(b, device=rows.device)[:, None, None], rows[None, :, None], heads[None, None, :])
        target.index_put_(index, grad, accumulate=True)


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
    ) -> None:
        """``plan.backward_groups`` (batched by key tile) serve the backward when present and
        there is no dropout (dropout masks follow the forward's batching)."""
        self.plan = plan
        self.kernel, self.masked_kernel = kernel, masked_kernel
        self.key_padding_mask = key_padding_mask
        self.group = group
        self.stats = stats or CommStats()
        self.comm = RingComm(group, plan.rank, plan.world_size, self.stats)

    # -- communication -----------------------------------------------------------
    def _exchange(
        self, phase: str, send: torch.Tensor | None, send_to: int, recv_numel: int, recv_from: int, like: torch.Tensor
    ) -> Exchange:
        """:meth:`RingComm.exchange` in ``phase`` (bytes accumulate, never reset), counting the received bytes too."""
        self.comm.phase = phase
        exchange = self.comm.exchange(send, send_to, recv_numel, recv_from, like)
        if exchange.recv is not None:
            self.stats.received[phase] += exchange.recv.numel() * exchange.recv.element_size()
        return exchange

    def _sources(self, k: torch.Tensor, v: torch.Tensor, phase: str):
        """Yield ``(source, k_buf, v_buf, padding_buf)`` per ring step (buffers ``None`` when
        nothing comes from that rank), prefetching the next step's rows while this one computes."""
        plan = self.plan
        world = plan.world_size
        pending = self._post_kv(k, v, 1, phase) if world > 1 else None
        yield plan.rank, k, v, self.key_padding_mask
        for step in range(1, world):
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

    def _post_kv(self, k: torch.Tensor, v: torch.Tensor, step: int, phase: str):
        """Post this step's rows: K|V (one flat buffer) and, with padding, the uint8 padding flags (a second one)."""
        plan = self.plan
        source, dest = (plan.rank - step) % plan.world_size, (plan.rank + step) % plan.world_size
        pad = self.key_padding_mask
        rows = plan.send_rows[dest]
        send = pad_send = None
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
    def _call_args(self, g: Group, pad: torch.Tensor | None, b: int) -> tuple[BlockKernel, dict]:
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

    def forward(self, q, k, v, acc: Accumulator) -> None:
        b = q.shape[0]
        self.stats.calls += 1
        for source, k_buf, v_buf, pad in self._sources(k, v, "forward"):
            for g in self.plan.groups[source] if k_buf is not None else ():
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
                out_rows = acc.out[:, :, g.heads].index_select(1, rows)
                lse_rows = acc.lse[:, :, g.heads].index_select(1, rows)
                kernel.backend.merge(out_rows, lse_rows, out, lse)
                acc.out[:, :, g.heads].index_copy_(1, rows, out_rows)
                acc.lse[:, :, g.heads].index_copy_(1, rows, lse_rows)

    def backward(self, q, k, v, out, lse, dout, grads) -> None:
        plan, b = self.plan, q.shape[0]
        dq, dk, dv = grads
        d = k.shape[-1]
        returning = []
        table = plan.groups
        if plan.backward_groups is not None and self.kernel.dropout_p == 0:
            table = plan.backward_groups
        for source, k_buf, v_buf, pad in self._sources(k, v, "backward"):
            dkv = None
            if source == plan.rank:
                dk_buf, dv_buf = dk, dv
            elif k_buf is not None:
                shape = (*k_buf.shape[:3], d + v_buf.shape[3])
                dkv = self.comm.empty("grad", math.prod(shape), dk).zero_().view(shape)
                dk_buf, dv_buf = dkv[..., :d], dkv[..., d:]
            for g in table[source] if k_buf is not None else ():
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

    def _post_grads(self, dkv: torch.Tensor | None, source: int, dk: torch.Tensor, value_dim: int):
        """Send the gradients of ``source``'s rows back; receive ours from the rank we sent rows to."""
        plan = self.plan
        dest = (2 * plan.rank - source) % plan.world_size  # the rank that got our rows at this step
        rows = plan.send_rows[dest]
        shape = (dk.shape[0], rows.numel(), dk.shape[2], dk.shape[3] + value_dim)
        send = None if dkv is None else dkv.view(-1)
        return self._exchange("backward", send, source, math.prod(shape), dest, dk), shape, rows


def _kernels(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool, padded: bool, dropout_p: float, scale: float, kernel: str | None
) -> tuple[BlockKernel, BlockKernel]:
    """The kernel for unmasked tiles (and causal diagonal tiles) and the one for masked tiles."""
    seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0 else 0
    chosen = []
    for has_mask in (padded, True):
        request = KernelRequest.for_tensors(q, k, causal=causal, has_mask=has_mask, dropout_p=dropout_p)
        chosen.append(BlockKernel(select_kernel(request, kernel), scale, dropout_p, seed))
    return chosen[0], chosen[1]


def block_sparse_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    block_size: int,
    block_layout: torch.Tensor | None = None,
    merge: str = "lse",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    kernel: str | None = None,
    layout: str = "contiguous",
    process_group: Any = None,
    stats: CommStats | None = None,
    transposed_backward: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention restricted to a block layout (SPEC.md), ``(B, N, H, D)`` shards in and out.

    Under a process group of ``P`` ranks each rank passes its shard (``layout``
    ``"contiguous"`` or ``"zigzag"``) and the layout is over the global ``N = n * P``.
    ``block_layout=None`` allows every block (plain dilated attention). ``stats``
    collects the bytes sent and received. ``transposed_backward`` batches the backward by
    key tile (whole dK/dV per call; the default) instead of by query tile. With
    ``return_lse`` also returns the log-sum-exp ``(B, H, n)``.
    """
    plan, schedule_args = _prepare(
        q,
        k,
        v,
        segment_lengths=segment_lengths,
        dilation_rates=dilation_rates,
        block_size=block_size,
        block_layout=block_layout,
        merge=merge,
        is_causal=is_causal,
        key_padding_mask=key_padding_mask,
        layout=layout,
        process_group=process_group,
        transposed_backward=transposed_backward,
    )
    dropout_p = check_dropout(dropout_p)
    scale = default_scale(q.shape[-1], softmax_scale)
    full, masked = _kernels(
        q, k, causal=is_causal, padded=key_padding_mask is not None, dropout_p=dropout_p, scale=scale, kernel=kernel
    )
    schedule = BlockSparseSchedule(plan, full, masked, key_padding_mask=key_padding_mask, stats=stats, **schedule_args)
    out, lse = blockwise_attention(schedule, q, k, v)
    return (out, lse.transpose(1, 2)) if return_lse else out


def _prepare(
    q,
    k,
    v,
    *,
    segment_lengths,
    dilation_rates,
    block_size,
    block_layout,
    merge,
    is_causal,
    key_padding_mask,
    layout,
    process_group,
    transposed_backward: bool = True,
    cache: dict | None = None,
    build: bool = True,
) -> tuple[Plan | None, dict]:
    """Validate everything (before any communication) and build or reuse the plan (if ``build``)."""
    segments, rates = check_dilated_config(segment_lengths, dilation_rates, merge)
    check_block_size(block_size)
    check_layout(layout)
    check_qkv(q, k, v, key_padding_mask)
    rank, world = group_rank_and_size(process_group)
    seq_len = q.shape[1] * world
    check_divisible(seq_len, world, layout)
    if block_layout is not None:
        check_block_layout(block_layout, seq_len, block_size, q.shape[2])
    key = (seq_len, q.shape[2], k.shape[2], bool(is_causal), rank, world, layout, str(q.device), transposed_backward)
    plan = None if cache is None else cache.get(key)
    if plan is None and build:
        plan = build_plan(
            seq_len=seq_len,
            num_heads=q.shape[2],
            num_kv_heads=k.shape[2],
            branch_list=branches(segments, rates, merge, q.shape[2]),
            block_size=block_size,
            block_layout=block_layout,
            causal=bool(is_causal),
            rank=rank,
            world_size=world,
            layout=layout,
            transposed_backward=transposed_backward,
        ).to(q.device)
        if cache is not None:
            cache[key] = plan
    return plan, {"group": process_group if world > 1 else None}


class BlockSparseRingDilatedAttention(nn.Module):
    """Exact block-sparse + dilated attention, on one device or as a sparse ring.

    ``pattern`` names a registered pattern (built with ``**pattern_options``) or is a
    :class:`~ring_blocksparse.Pattern`; ``block_layout`` is an explicit bool
    ``(H or 1, ceil(N/b), ceil(N/b))`` over the global sequence; neither means every
    block (plain dilated attention). Forward: ``attn(q, k, v, *, is_causal=False,
    key_padding_mask=None)`` on this rank's ``(B, n, H, D)`` shard. ``transposed_backward``
    batches the backward by key tile (each call yields whole dK/dV rows). ``method``:
    ``"gather"`` (tiles gathered into dense blocks, the blockwise engine; everything,
    including the ring), ``"flex"`` (one FlexAttention kernel on a BlockMask; one process,
    one rate-1 branch, no padding/dropout; raises otherwise) or ``"auto"`` (flex on CUDA
    when it applies, else gather). ``flex_kernel_options``: FlexAttention ``kernel_options``
    (e.g. ``{"fwd_num_stages": 2}``) over the safe flags and tuned tiles the flex path
    picks itself (:func:`ring_blocksparse.flex.kernel_options_for`). After each call,
    ``comm_stats`` holds the bytes this rank sent and received, and ``last_plan`` the plan.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        block_size: int = 64,
        pattern: str | Pattern | None = None,
        block_layout: torch.Tensor | None = None,
        layout: str = "contiguous",
        process_group: Any = None,
        merge: str = "lse",
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        kernel: str | None = None,
        transposed_backward: bool = True,
        method: str = "auto",
        flex_kernel_options: dict[str, Any] | None = None,
        **pattern_options: Any,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_dilated_config(segment_lengths, dilation_rates, merge)
        self.block_size = check_block_size(block_size)
        self.layout = check_layout(layout)
        if pattern is not None and block_layout is not None:
            raise ValueError("give either pattern or block_layout, not both")
        if pattern_options and pattern is None:
            raise ValueError(f"pattern options {sorted(pattern_options)} were given without a pattern")
        if isinstance(pattern, str):
            pattern = build_pattern(pattern, **pattern_options)
        elif pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a registered pattern name or a Pattern, got {pattern!r}")
        elif pattern_options:
            raise ValueError(f"pattern options {sorted(pattern_options)} only apply to a pattern given by name")
        if block_layout is not None and (
            not isinstance(block_layout, torch.Tensor) or block_layout.dtype != torch.bool or block_layout.dim() != 3
        ):
            raise TypeError(f"block_layout must be a bool tensor (H or 1, ceil(N/b), ceil(N/b)), got {block_layout!r}")
        self.pattern = pattern
        self.block_layout = block_layout
        self.process_group = process_group
        self.merge = merge
        self.softmax_scale = softmax_scale
        self.dropout = check_dropout(dropout)
        self.kernel = kernel
        self.transposed_backward = bool(transposed_backward)
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.method = method
        self.flex_kernel_options = check_kernel_options(flex_kernel_options)
        self.last_method: str | None = None
        self._block_masks: dict = {}
        self._flex_failed = False
        self.comm_stats = CommStats()
        self.last_plan: Plan | None = None
        self._plans: dict = {}
        self._layouts: dict = {}

    def layout_for(self, seq_len: int, num_heads: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The block layout used for a global sequence of ``seq_len`` (``None``: every block)."""
        if self.pattern is None:
            return self.block_layout
        key = (seq_len, num_heads)
        if key not in self._layouts:
            self._layouts[key] = self.pattern.layout(seq_len, self.block_size, num_heads)
        return self._layouts[key]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_qkv(q, k, v, key_padding_mask)
        _, world = group_rank_and_size(self.process_group)
        block_layout = self.layout_for(q.shape[1] * world, q.shape[2])
        dropout_p = self.dropout if self.training else 0.0
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        use_flex = self._use_flex(q, world, key_padding_mask, dropout_p, needs_grad)
        prepare = functools.partial(
            _prepare,
            q,
            k,
            v,
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            block_size=self.block_size,
            block_layout=block_layout,
            merge=self.merge,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            layout=self.layout,
            process_group=self.process_group,
            transposed_backward=self.transposed_backward,
            cache=self._plans,
        )
        plan, schedule_args = prepare(build=not use_flex)  # validates everything first
        self.comm_stats = CommStats()
        scale = default_scale(q.shape[-1], self.softmax_scale)
        if use_flex:
            try:
                out = self._flex_forward(q, k, v, block_layout, bool(is_causal), scale)
                self.last_plan, self.last_method = None, "flex"
                return out
            except Exception as exc:
                if self.method == "flex":
                    raise
                warnings.warn(
                    f"FlexAttention failed ({type(exc).__name__}: {exc}); method='auto' uses the gather path "
                    "from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._flex_failed = True
                plan, schedule_args = prepare(build=True)
        self.last_plan, self.last_method = plan, "gather"
        full, masked = _kernels(
            q,
            k,
            causal=is_causal,
            padded=key_padding_mask is not None,
            dropout_p=dropout_p,
            scale=scale,
            kernel=self.kernel,
        )
        schedule = BlockSparseSchedule(
            plan, full, masked, key_padding_mask=key_padding_mask, stats=self.comm_stats, **schedule_args
        )
        out, _ = blockwise_attention(schedule, q, k, v)
        return out

    def _flex_forward(self, q, k, v, block_layout, causal: bool, scale: float) -> torch.Tensor:
        key = (q.shape[1], q.shape[2], q.shape[3], q.dtype, causal, str(q.device))
        if key not in self._block_masks:  # built once per shape: no host work or sync on later calls
            block_mask, flags = build_block_mask(
                block_layout,
                seq_len=q.shape[1],
                num_heads=q.shape[2],
                block_size=self.block_size,
                segment=self.segment_lengths[0],
                causal=causal,
                device=q.device,
            )
            self._block_masks[key] = block_mask, kernel_options_for(q, flags, self.flex_kernel_options)
        block_mask, options = self._block_masks[key]
        return flex_block_sparse(q, k, v, block_mask, scale=scale, kernel_options=options)

    def _use_flex(self, q: torch.Tensor, world: int, key_padding_mask, dropout_p: float, needs_grad: bool) -> bool:
        if self.method == "gather" or (self.method == "auto" and self._flex_failed):
            return False
        reasons = flex_reasons(
            q,
            world_size=world,
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            merge=self.merge,
            block_size=self.block_size,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            needs_grad=needs_grad,
        )
        if self.method == "flex" and reasons:
            raise ValueError("method='flex' cannot run this call: " + "; ".join(reasons))
        return not reasons and (self.method == "flex" or q.device.type == "cuda")

    def extra_repr(self) -> str:
        pattern = "none" if self.pattern is None else repr(self.pattern)
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"block_size={self.block_size}, pattern={pattern}, layout={self.layout!r}, merge={self.merge!r}"
        )
