"""The functional form of block-sparse dilated attention: one call, no module state kept between calls.

The same computation as :class:`ring_blocksparse.BlockSparseRingDilatedAttention`'s gather path
(see :mod:`ring_blocksparse.attention`), with the plan built for the call and dropped after its backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ring_core.plugin import (
    CallOp,
    OpCall,
    check_dropout,
    check_scale,
    check_window,
    default_scale,
    run_attention,
)

from .checks import _agree, _prepare
from .gather import BlockSparseSchedule, CommStats, _kernels
from .plan import Plan


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
    timeout: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention restricted to a block layout (SPEC.md), ``(B, N, H, D)`` shards in and out.

    Under a process group of ``P`` ranks each rank passes its shard (``layout``
    ``"contiguous"`` or ``"zigzag"``) and the layout is over the global ``N = n * P``.
    ``block_layout=None`` allows every block (plain dilated attention). ``stats``
    collects the bytes sent and received. ``transposed_backward`` batches the backward by
    key tile (whole dK/dV per call; the default) instead of by query tile. With
    ``return_lse`` also returns the log-sum-exp ``(B, H, n)``. Across ranks, every call first
    checks (one small all-gather) that all ranks passed the same shapes, flags, configuration
    and block layout, else every rank raises the same ``RingConfigError``; ``timeout``
    (seconds, ``None``: forever) bounds every wait for a peer (``CollectiveError`` after).
    ``window_size`` and ``cu_seqlens`` (global document boundaries, ``B = 1``) as in
    :func:`ring_core.dilated_attention`; the layout indexes global positions.

    This function runs the gather path and plans every call anew; repeated calls on CUDA are
    much faster through :class:`~ring_blocksparse.BlockSparseRingDilatedAttention` (plans cached
    per shape, the strips' fused kernels: ``docs/benchmarks/blocksparse-strips-gather-h200.json``).
    """
    dropout_p = check_dropout(dropout_p)
    softmax_scale = check_scale(softmax_scale)
    window = check_window(window_size)
    documents = _agree(
        q, k, v, segment_lengths=segment_lengths, dilation_rates=dilation_rates, block_size=block_size,
        layout_of=lambda seq_len, num_heads: block_layout, merge=merge, is_causal=is_causal,
        key_padding_mask=key_padding_mask, layout=layout, process_group=process_group, softmax_scale=softmax_scale,
        dropout_p=dropout_p, transposed_backward=transposed_backward, timeout=timeout,
        name="block_sparse_dilated_attention", window=window, cu_seqlens=cu_seqlens, return_lse=return_lse,
    )  # fmt: skip
    scale = default_scale(q.shape[-1], softmax_scale)
    # this call's plan, built once for its forward and backward
    plans: dict[tuple[int, ...] | None, tuple[Plan | None, dict[str, Any]]] = {}

    def make(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSparseSchedule:
        if call.documents not in plans:
            plans[call.documents] = _prepare(
                q, k, v, segment_lengths=segment_lengths, dilation_rates=dilation_rates, block_size=block_size,
                block_layout=block_layout, merge=merge, is_causal=is_causal, key_padding_mask=key_padding_mask,
                layout=layout, process_group=process_group, transposed_backward=transposed_backward,
                timeout=timeout, window=window, documents=call.documents,
            )  # fmt: skip
        plan, schedule_args = plans[call.documents]
        assert plan is not None  # (built)
        mask = call.key_padding_mask
        full, masked = _kernels(
            q, k, causal=call.causal, padded=mask is not None, dropout_p=call.dropout_p, scale=scale, kernel=kernel,
            seed=call.seed,
        )  # fmt: skip
        return BlockSparseSchedule(plan, full, masked, key_padding_mask=mask, stats=stats, **schedule_args)

    out, lse = run_attention(
        CallOp(make), q, k, v, key_padding_mask=key_padding_mask, causal=bool(is_causal), dropout_p=dropout_p,
        lse_grad=return_lse, cu_seqlens=cu_seqlens, documents=documents,
    )  # fmt: skip
    return (out, lse.transpose(1, 2)) if return_lse else out
