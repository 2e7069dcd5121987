"""The float64 reference of SPEC.md, evaluated densely (small sizes only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .validation import check_dilated_config

__all__ = [
    "branch_counts",
    "reference_attention",
]


def branch_counts(
    seq_len: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str = "lse",
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``C[h, t, s]``: how many branches let query ``t`` of head ``h`` see key ``s``."""
    check_dilated_config(segment_lengths, dilation_rates, merge)
    from .dilated import branches

    t = torch.arange(seq_len, device=device)
    counts = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.float64, device=device)
    for branch in branches(segment_lengths, dilation_rates, merge, num_heads):
        same_segment = (t[:, None] // branch.segment) == (t[None, :] // branch.segment)
        for h in range(branch.head_start, branch.head_stop):
            selected = (t % branch.rate) == (h % branch.rate)
            counts[h] += (selected[:, None] & selected[None, :] & same_segment).double()
    return counts


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    merge: str = "lse",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    block_layout: torch.Tensor | None = None,
    block_size: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SPEC.md's attention in float64, ``(B, N, H, D)`` in and out, differentiable.

    Without ``segment_lengths`` it is dense attention. ``block_layout`` (bool
    ``(H or 1, ceil(N/b), ceil(N/b))``) with ``block_size`` further restricts keys.
    A query that sees no key gets 0. ``return_lse`` also returns the log-sum-exp of
    the scores ``(B, H, N)`` (``-inf`` for a query that sees no key; :mod:`ring_core.lse`).
    """
    q64, k64, v64 = (x.double() for x in (q, k, v))
    b, n, h, d = q64.shape
    groups = h // k64.shape[2]
    if groups > 1:
        k64 = k64.repeat_interleave(groups, dim=2)
        v64 = v64.repeat_interleave(groups, dim=2)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    if segment_lengths is None:
        counts = torch.ones(h, n, n, dtype=torch.float64, device=q.device)
    else:
        counts = branch_counts(n, h, segment_lengths, dilation_rates, merge, q.device)
    if block_layout is not None:
        blocks = torch.arange(n, device=q.device) // block_size
        allowed = block_layout.to(q.device)[:, blocks][:, :, blocks]
        counts = counts * allowed.double()
    counts = counts.expand(b, h, n, n)
    if is_causal:
        counts = counts * torch.ones(n, n, dtype=torch.float64, device=q.device).tril()
    if key_padding_mask is not None:
        counts = counts * (~key_padding_mask.to(q.device))[:, None, None, :].double()
    logits = torch.einsum("bnhd,bmhd->bhnm", q64, k64) * scale + torch.log(counts)
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhnm,bmhd->bnhd", probs, v64)
    if not return_lse:
        return out
    lse = torch.where(denom > 0, row_max + torch.log(torch.where(denom > 0, denom, torch.ones_like(denom))), -math.inf)
    return out, lse.squeeze(-1)
