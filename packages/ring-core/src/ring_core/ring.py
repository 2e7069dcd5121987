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
Everything is one :class:`~ring_core.engine.BlockSchedule` run through
:func:`~ring_core.engine.blockwise_attention`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .agreement import RingConfigError, agree_across_ranks, differing_fields, validate_ring_inputs
from .comm import Exchange, RingComm, RingCommStats, check_transport, ring_comm
from .dilated import DilatedSchedule, branches, offset_heads
from .dispatch import block_kernel
from .engine import blockwise_attention
from .ring_plan import RingPlan, Transfer, build_ring_plan, segments_within_shards
from .ring_schedule import RingDilatedSchedule, send_bounds
from .sharding import check_layout
from .validation import check_dilated_config, check_dropout

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


def _run(
    q,
    k,
    v,
    *,
    comm: RingComm,
    branch_cfg,
    merge,
    layout,
    is_causal,
    key_padding_mask,
    softmax_scale,
    dropout_p,
    kernel,
) -> tuple[torch.Tensor, torch.Tensor]:
    segments, rates = branch_cfg
    seq_len = q.shape[1] * comm.world_size
    branch_list = tuple(branches(segments, rates, merge, q.shape[2]))
    bound = block_kernel(
        q, k, causal=is_causal, has_mask=key_padding_mask is not None, dropout_p=dropout_p,
        softmax_scale=softmax_scale, kernel=kernel,
    )  # fmt: skip
    comm.stats.calls += 1
    if segments_within_shards(q.shape[1], comm.world_size, layout, segments):
        # nothing to exchange: the single-device schedule on this shard computes the same blocks
        schedule = DilatedSchedule(bound, branch_list, causal=is_causal, key_padding_mask=key_padding_mask)
    else:
        plan = build_ring_plan(
            seq_len, comm.world_size, comm.rank, layout, branch_list, q.shape[2], k.shape[2], bool(is_causal), q.device
        )
        schedule = RingDilatedSchedule(
            bound, plan, comm, causal=is_causal, key_padding_mask=key_padding_mask,
            send_bounds=send_bounds(q, k, v, len(branch_list)),
        )  # fmt: skip
    return blockwise_attention(schedule, q, k, v)


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
) -> torch.Tensor:
    """Ring dilated attention of this rank's shard ``(B, N/P, H, D)``; returns this rank's output shard.

    ``key_padding_mask`` is this rank's shard ``(B, N/P)`` (True = padding). Validates
    (collectively) on every call; :class:`RingDilatedAttention` validates once per shape.
    ``transport``: see :class:`RingDilatedAttention`.
    """
    segments, rates = check_dilated_config(segment_lengths, dilation_rates, merge)
    check_layout(layout)
    dropout_p = check_dropout(dropout_p)
    comm = ring_comm(process_group, stats or RingCommStats(), check_transport(transport), q.device)
    config = (segments, rates, merge, layout, dropout_p)
    validate_ring_inputs(
        q,
        k,
        v,
        key_padding_mask,
        causal=bool(is_causal),
        layout=layout,
        merge=merge,
        config=config,
        scale=softmax_scale,
        comm=comm,
    )
    out, _ = _run(
        q,
        k,
        v,
        comm=comm,
        branch_cfg=(segments, rates),
        merge=merge,
        layout=layout,
        is_causal=bool(is_causal),
        key_padding_mask=key_padding_mask,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        kernel=kernel,
    )
    return out


class RingAttentionBase(nn.Module):
    """The constructor of the ring attention modules: checks, normalises and stores their common arguments.

    ``segment_lengths`` and ``dilation_rates`` become tuples of ints; ``layout``,
    ``merge``, ``dropout``, ``kernel`` (a kernel backend name or None) and ``transport``
    (:data:`ring_core.comm.TRANSPORTS`) are checked. Subclasses get :attr:`comm_stats` (bytes
    this rank sends) and :meth:`validate_once`, and define ``forward``.
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
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_dilated_config(segment_lengths, dilation_rates, merge)
        self.merge = merge
        self.layout = check_layout(layout)
        self.process_group = process_group
        self.softmax_scale = softmax_scale
        self.dropout = check_dropout(dropout)
        if kernel is not None and not isinstance(kernel, str):
            raise TypeError(f"kernel must be a kernel backend name or None, got {kernel!r}")
        self.kernel = kernel
        self.transport = check_transport(transport)
        self.comm_stats = RingCommStats()
        self._validated: set[tuple] = set()

    def validate_once(self, validate: Callable[[], None], *call: Any) -> None:
        """Run ``validate`` the first time this module sees the call signature ``call``.

        ``validate`` is a collective check (e.g. :func:`~ring_core.agreement.validate_ring_inputs`)
        that raises the same error on every rank; ``call`` holds the call's tensors (compared by
        shape, dtype and device) and any other values its result depends on. A signature seen
        before skips the check and its communication.
        """
        key = tuple(_signature(x) for x in call)
        if key not in self._validated:
            validate()
            self._validated.add(key)

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"merge={self.merge!r}, layout={self.layout!r}, dropout={self.dropout}"
        )


class RingDilatedAttention(RingAttentionBase):
    """Exact LongNet dilated (and dense) attention with the sequence sharded over a process group.

    ``attn(q_local, k_local, v_local, *, is_causal=False, key_padding_mask=None)`` takes
    this rank's shard ``(B, N/P, H, D)`` (layout ``"contiguous"`` or ``"zigzag"``, see
    :func:`ring_core.shard_sequence`) and returns this rank's output shard.
    ``process_group=None`` is the default group when one is initialised, else one
    process. Bytes sent by this rank are counted in :attr:`comm_stats`.

    ``transport``: ``"nccl"`` (default) moves K/V and dK/dV with ``batch_isend_irecv`` of the
    group's backend; ``"copy_engine"`` with the GPUs' copy engines
    (:class:`~ring_core.comm.CopyEngineComm`: no SMs taken from the kernels; CUDA tensors in
    an NCCL group on one host, else a clear error on every rank).
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        comm = ring_comm(self.process_group, self.comm_stats, self.transport, q.device)
        dropout_p = self.dropout if self.training else 0.0
        self._check(q, k, v, key_padding_mask, bool(is_causal), dropout_p, comm)
        return self.attend(
            q, k, v, is_causal=bool(is_causal), key_padding_mask=key_padding_mask, dropout_p=dropout_p, comm=comm
        )

    def _check(self, q, k, v, key_padding_mask, is_causal: bool, dropout_p: float, comm: RingComm) -> None:
        """Inputs agree across ranks (checked once per new signature, errors naming this class)."""
        config = (self.segment_lengths, self.dilation_rates, self.merge, self.layout, dropout_p)

        def validate() -> None:
            validate_ring_inputs(
                q, k, v, key_padding_mask, causal=is_causal, layout=self.layout, merge=self.merge, config=config,
                scale=self.softmax_scale, comm=comm, name=type(self).__name__,
            )  # fmt: skip

        self.validate_once(validate, q, k, v, key_padding_mask, is_causal, config, comm.world_size)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        comm: RingComm,
    ) -> torch.Tensor:
        """This rank's output shard for inputs that :meth:`forward` already checked across ranks.

        The extension point of subclasses that compute some calls another way (ring-flash's
        fused single-device path) and hand the rest to ``super().attend``. ``dropout_p`` is
        the call's (0 in eval mode); ``comm`` is the communicator of :attr:`process_group`.
        """
        out, _ = _run(
            q, k, v, comm=comm, branch_cfg=(self.segment_lengths, self.dilation_rates), merge=self.merge,
            layout=self.layout, is_causal=is_causal, key_padding_mask=key_padding_mask,
            softmax_scale=self.softmax_scale, dropout_p=dropout_p, kernel=self.kernel,
        )  # fmt: skip
        return out


def _signature(x: Any) -> Any:
    """A tensor by shape, dtype and device (never its values); other values as they are, or by type if unhashable."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape), x.dtype, x.device
    try:
        hash(x)
    except TypeError:
        return type(x)
    return x
