"""Ring attention over a ``torch.distributed`` process group: exact dilated (and dense) attention.

Each rank holds a shard of the sequence (layout ``"contiguous"`` or ``"zigzag"``, see
:mod:`ring_core.sharding`). This module holds what users call:
:func:`ring_dilated_attention`, :class:`RingDilatedAttention` and its constructor
:class:`RingAttentionBase`. Which blocks a rank computes and what travels is the plan
(:mod:`ring_core.ring_plan`); running it, forward and backward with communication
overlapped, is the schedule (:mod:`ring_core.ring_schedule`); every rank raising the same
error is :mod:`ring_core.agreement`.

A branch whose segments fit inside every shard sends nothing (the single-device
schedule on the shard computes the same blocks), and dense attention
(``segment_lengths=[w >= N]``, rate 1) is the classic ring with the causal blocks skipped.
Everything is one :class:`~ring_core.engine.BlockSchedule` run by the engine inside the custom
ops of :mod:`ring_core.ops` (one op for ``torch.compile``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .agreement import RingConfigError, agree_across_ranks, differing_fields, validate_inputs, validate_ring_inputs
from .comm import Exchange, RingComm, RingCommStats, check_transport, ring_comm
from .dilated import DilatedSchedule, branches, offset_heads
from .dispatch import block_kernel
from .engine import BlockSchedule, schedule_backward, schedule_forward
from .ops import AttentionOp, OpCall, run_attention
from .ring_plan import RingPlan, Transfer, build_ring_plan, segments_within_shards
from .ring_schedule import RingDilatedSchedule, send_bounds
from .sharding import check_layout, group_rank_and_size
from .validation import (
    check_dilated_config,
    check_dropout,
    check_scale,
    check_timeout,
    check_window,
    varlen_layout,
)
from .windows import NO_WINDOW

# The ring's names as they were before the plan, schedule and agreement got their own modules.
__all__ = [
    "Exchange",
    "RingAttentionBase",
    "RingComm",
    "RingCommStats",
    "RingConfigError",
    "RingDilatedAttention",
    "RingDilatedSchedule",
    "RingPlan",
    "Transfer",
    "agree_across_ranks",
    "build_ring_plan",
    "differing_fields",
    "offset_heads",
    "ring_dilated_attention",
    "segments_within_shards",
    "send_bounds",
    "validate_ring_inputs",
]


def _schedule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    comm: RingComm,
    config: tuple[Sequence[int], Sequence[int], str],
    layout: str,
    call: OpCall,
    softmax_scale: float | None,
    kernel: str | None,
    window: tuple[int, int] = NO_WINDOW,
) -> BlockSchedule:
    """The blocks of one ring call: ``config`` is ``(segment_lengths, dilation_rates, merge)``; ``window`` the
    module's ``window_size`` and ``call.documents`` the call's global document boundaries."""
    segments, rates, merge = config
    mask, documents = call.key_padding_mask, call.documents
    branch_list = tuple(branches(segments, rates, merge, q.shape[2]))
    bound = block_kernel(
        q, k, causal=call.causal, has_mask=mask is not None, dropout_p=call.dropout_p, softmax_scale=softmax_scale,
        kernel=kernel, seed=call.seed, window=window != NO_WINDOW,
    )  # fmt: skip
    if (documents is None or comm.world_size == 1) and segments_within_shards(
        q.shape[1], comm.world_size, layout, segments
    ):
        # nothing to exchange: the single-device schedule on this shard computes the same blocks
        return DilatedSchedule(
            bound, branch_list, causal=call.causal, key_padding_mask=mask, window=window, documents=documents
        )
    seq_len = q.shape[1] * comm.world_size
    plan = build_ring_plan(
        seq_len, comm.world_size, comm.rank, layout, branch_list, q.shape[2], k.shape[2], call.causal, q.device,
        window=window, documents=documents, native_window=bound.backend.supports_window,
    )  # fmt: skip
    return RingDilatedSchedule(
        bound, plan, comm, causal=call.causal, key_padding_mask=mask,
        send_bounds=send_bounds(q, k, v, len(branch_list)),
    )  # fmt: skip


class _ModuleOp(AttentionOp):
    """The custom ops' side of a ring module: its :meth:`~RingAttentionBase.attention_forward` and backward."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner: RingAttentionBase = self.owner
        return owner.attention_forward(q, k, v, call)

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: OpCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        owner: RingAttentionBase = self.owner
        return owner.attention_backward(dout, q, k, v, out, lse, call)


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str = "lse",
    layout: str = "contiguous",
    process_group: Any = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    kernel: str | None = None,
    stats: RingCommStats | None = None,
    transport: str = "nccl",
    return_lse: bool = False,
    window_size: tuple[int, int] = NO_WINDOW,
    cu_seqlens: torch.Tensor | None = None,
    timeout: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Ring dilated attention of this rank's shard ``(B, N/P, H, D)``; returns this rank's output shard.

    ``key_padding_mask`` is this rank's shard ``(B, N/P)`` (True = padding). Validates
    (collectively) on every call, as :class:`RingDilatedAttention` does. ``transport``,
    ``return_lse`` and ``timeout``: see :class:`RingDilatedAttention`. ``window_size`` and
    ``cu_seqlens`` (global document boundaries, the same tensor on every rank) as in
    :func:`ring_core.dilated_attention`; flash-attn's varlen layout ``(n, H, D)`` per rank is
    accepted with ``cu_seqlens``.
    """
    (q, k, v, key_padding_mask), unbatched = varlen_layout(cu_seqlens, q, k, v, key_padding_mask)
    attn = RingDilatedAttention(
        segment_lengths, dilation_rates, merge, layout, process_group, softmax_scale, dropout_p, kernel,
        transport=transport, window_size=window_size, timeout=timeout,
    )  # fmt: skip
    if stats is not None:
        attn.comm_stats = stats
    result: torch.Tensor | tuple[torch.Tensor, torch.Tensor] = attn(
        q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, return_lse=return_lse, cu_seqlens=cu_seqlens
    )
    if not unbatched:
        return result
    return (result[0][0], result[1][0]) if return_lse else result[0]


class RingAttentionBase(nn.Module):
    """The constructor of the ring attention modules: checks, normalises and stores their common arguments.

    ``segment_lengths`` and ``dilation_rates`` become tuples of ints; ``layout``,
    ``merge``, ``softmax_scale``, ``dropout``, ``kernel`` (a kernel backend name or None),
    ``transport`` (:data:`ring_core.comm.TRANSPORTS`), ``window_size`` and ``timeout`` (seconds
    or ``None``) are checked. Subclasses get :attr:`comm_stats` (bytes this rank sends),
    :attr:`step` (calls so far, counted by ``forward``) and :meth:`context` (how this rank's
    errors start), and define ``forward``.

    The attention itself runs inside the custom ops of :mod:`ring_core.ops` (one op for
    ``torch.compile``): :meth:`run` calls them, and they call back :meth:`attention_forward`
    and :meth:`attention_backward`, which by default run :meth:`attention_schedule`: the
    extension points of subclasses that compute some calls another way (ring-flash's fused
    single-device path).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        merge: str = "lse",
        layout: str = "contiguous",
        process_group: Any = None,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        kernel: str | None = None,
        *,
        transport: str = "nccl",
        window_size: tuple[int, int] = NO_WINDOW,
        timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_dilated_config(segment_lengths, dilation_rates, merge)
        self.window_size = check_window(window_size)
        self.merge = merge
        self.layout = check_layout(layout)
        self.process_group = process_group
        self.softmax_scale = check_scale(softmax_scale)
        self.dropout = check_dropout(dropout)
        if kernel is not None and not isinstance(kernel, str):
            raise TypeError(f"kernel must be a kernel backend name or None, got {kernel!r}")
        self.kernel = kernel
        self.transport = check_transport(transport)
        self.timeout = check_timeout(timeout)
        self.comm_stats = RingCommStats()
        self.step = 0
        self._op = _ModuleOp(self)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The call every ring module answers (each subclass computes it its own way).

        Args:
            q: ``(B, N/P, H, D)``, this rank's queries in ``layout``; float64, float32, float16
                or bfloat16.
            k: ``(B, N/P, H_kv, D)``, ``H % H_kv == 0``; same dtype and device as ``q``.
            v: ``(B, N/P, H_kv, D_v)``.
            is_causal: query ``t`` sees only keys ``s <= t`` (global positions).
            key_padding_mask: bool ``(B, N/P)``, this rank's shard, ``True`` where a key is padding.
            return_lse: also return the log-sum-exp of each query row's scores, ``(B, H, N/P)``.
            cu_seqlens: 1-D integer tensor ``[0, ..., N]``: the global document boundaries of a packed
                batch of one, the same tensor on every rank (documents may cross shards).

        Returns:
            ``(B, N/P, H, D_v)``: this rank's rows of the output, dtype and device of ``q``;
            with ``return_lse``, the pair ``(out, lse)``.
        """
        raise NotImplementedError(f"{type(self).__name__} must define forward")

    @property
    def step(self) -> int:
        """Calls so far (named in communication errors)."""
        return int(self._steps)

    @step.setter
    def step(self, value: int) -> None:
        # kept in a tensor and counted with _steps.add_(1): torch.compile specialises on a module's int
        # attributes, so an int counted in forward made every call recompile (a CPU tensor never syncs)
        self._steps = torch.full((), value, dtype=torch.int64)

    def count_step(self) -> None:
        """Count one call (``forward`` of every subclass calls it first)."""
        self._steps.add_(1)

    def context(self) -> str:
        """How errors of this rank's current call start: the class, the global rank and the call (``step``)."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return f"{type(self).__name__} rank {rank}, step {self.step}: "

    def run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        return_lse: bool,
        seed: int | None = None,
        cu_seqlens: torch.Tensor | None = None,
        documents: Sequence[int] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """This rank's output shard (and ``lse`` ``(B, H, N/P)`` with ``return_lse``) of checked inputs.

        ``seed``: dropout's (see :func:`~ring_core.ops.run_attention`); ``cu_seqlens``: the
        checked global document boundaries (the op gives them as :attr:`~ring_core.ops.OpCall.documents`);
        ``documents``: their values, when the caller has read them (the op then reads nothing).
        """
        out, lse = run_attention(
            self._op, q, k, v, key_padding_mask=key_padding_mask, causal=causal, dropout_p=dropout_p,
            lse_grad=return_lse, seed=seed, cu_seqlens=cu_seqlens, documents=documents,
        )  # fmt: skip
        return (out, lse.transpose(1, 2)) if return_lse else out

    def attention_schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSchedule:
        """The blocks of one call (when the op runs: plans, kernels and communicators are made here)."""
        raise NotImplementedError(f"{type(self).__name__} defines neither attention_schedule nor attention_forward")

    def attention_forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``out`` and ``lse`` ``(B, N/P, H)`` of one call, inside the forward op (no autograd here)."""
        self.comm_stats.calls += 1
        return schedule_forward(self.attention_schedule(q, k, v, call), q, k, v)

    def attention_backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: OpCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dq, dk, dv`` of one call from the final ``out`` and ``lse``, inside the backward op."""
        return schedule_backward(self.attention_schedule(q, k, v, call), q, k, v, out, lse, dout)

    def extra_repr(self) -> str:
        window = f", window_size={self.window_size}" if self.window_size != NO_WINDOW else ""
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"merge={self.merge!r}, layout={self.layout!r}, dropout={self.dropout}{window}"
        )


class RingDilatedAttention(RingAttentionBase):
    """Exact LongNet dilated (and dense) attention with the sequence sharded over a process group.

    ``attn(q_local, k_local, v_local, *, is_causal=False, key_padding_mask=None)`` takes
    this rank's shard ``(B, N/P, H, D)`` (layout ``"contiguous"`` or ``"zigzag"``, see
    :func:`ring_core.shard_sequence`) and returns this rank's output shard.
    ``process_group=None`` is the default group when one is initialised, else one
    process. Bytes sent by this rank are counted in :attr:`comm_stats`. Every call first checks,
    with one small all-gather, that all ranks passed the same shapes, dtypes, flags and
    configuration (else every rank raises the same :class:`RingConfigError`). With
    ``return_lse=True`` it returns ``(out, lse)``, ``lse`` ``(B, H, N/P)`` of this rank's rows
    (:mod:`ring_core.lse`). ``window_size`` (constructor) is a sliding window; ``cu_seqlens``
    (forward) the global document boundaries of a packed batch of one (the same tensor on every
    rank; documents may cross shards). Only keys that a peer's query can see travel.

    ``transport``: ``"nccl"`` (default) moves K/V and dK/dV with ``batch_isend_irecv`` of the
    group's backend; ``"copy_engine"`` with the GPUs' copy engines
    (:class:`~ring_core.comm.CopyEngineComm`: no SMs taken from the kernels; CUDA tensors in
    an NCCL group on one host, else a clear error on every rank).

    ``timeout`` (seconds, default ``None``: wait forever) bounds every wait for a peer: a
    stalled or dead peer raises :class:`~ring_core.comm.CollectiveError` naming this rank, the
    call (``step``), the exchange and the peers.
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Dilated (or dense) attention over the whole sequence, from this rank's shard (SPEC.md).

        Every rank of ``process_group`` calls it at once with its shard in ``layout``
        (:func:`ring_core.shard_sequence`); keys and values travel around the ring.

        Args:
            q: ``(B, N/P, H, D)``, this rank's queries; float64, float32, float16 or bfloat16.
            k: ``(B, N/P, H_kv, D)``, this rank's keys, ``H % H_kv == 0``; same dtype and device.
            v: ``(B, N/P, H_kv, D_v)``, this rank's values.
            is_causal: query ``t`` sees only keys ``s <= t`` (global positions).
            key_padding_mask: bool ``(B, N/P)``, this rank's shard, ``True`` where a key is padding.
            return_lse: also return the log-sum-exp of each query row's scores, ``(B, H, N/P)``,
                float32 (float64 for float64 inputs).
            cu_seqlens: 1-D integer tensor ``[0, ..., N]``: the global document boundaries of a packed
                batch of one, the same tensor on every rank (documents may cross shards).

        Returns:
            ``(B, N/P, H, D_v)``: this rank's rows of the output, dtype and device of ``q``.
            With ``return_lse``, the pair ``(out, lse)``.

        Raises:
            RingConfigError: the ranks disagree (shapes, dtypes, flags) or ``N`` does not fit the
                layout; every rank raises the same error, none hangs.
        """
        self.count_step()
        dropout_p = self.dropout if self.training else 0.0
        documents = self._check(q, k, v, key_padding_mask, bool(is_causal), dropout_p, cu_seqlens, return_lse)
        return self.run(
            q, k, v, causal=bool(is_causal), key_padding_mask=key_padding_mask, dropout_p=dropout_p,
            return_lse=return_lse, cu_seqlens=cu_seqlens, documents=documents,
        )  # fmt: skip

    def _check(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
        dropout_p: float,
        cu_seqlens: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> tuple[int, ...] | None:
        """Inputs agree across ranks, on every call: ranks that have all seen two signatures may still call with
        different ones (equal byte sizes would then give a wrong result silently). Errors name this class.
        Returns ``cu_seqlens``' checked values (None without), which the ops reuse instead of reading them again.
        ``return_lse`` is agreed on too: the lse's gradient is one more pass of the ring's backward."""
        config = (
            self.segment_lengths, self.dilation_rates, self.merge, self.layout, dropout_p, self.window_size,
            bool(return_lse),
        )  # fmt: skip
        return validate_inputs(
            q, k, v, key_padding_mask, world_size=group_rank_and_size(self.process_group)[1],
            comms=lambda: [self._comm(q.device)], cu_seqlens=cu_seqlens, causal=is_causal, layout=self.layout,
            merge=self.merge, config=config, scale=self.softmax_scale, name=type(self).__name__,
            window_size=self.window_size,
        )  # fmt: skip

    def _comm(self, device: torch.device) -> RingComm:
        return ring_comm(
            self.process_group, self.comm_stats, self.transport, device, timeout=self.timeout, context=self.context()
        )

    def attention_schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSchedule:
        comm = self._comm(q.device)
        return _schedule(
            q, k, v, comm=comm, config=(self.segment_lengths, self.dilation_rates, self.merge), layout=self.layout,
            call=call, softmax_scale=self.softmax_scale, kernel=self.kernel, window=self.window_size,
        )  # fmt: skip
