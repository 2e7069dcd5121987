"""The float64 reference of SPEC.md, evaluated densely (small sizes only)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .validation import check_cu_seqlens, check_dilated_config, check_window


def _document_positions(
    seq_len: int, cu_seqlens: torch.Tensor | None, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's document and its position inside the document (one document without ``cu_seqlens``)."""
    t = torch.arange(seq_len, device=device)
    if cu_seqlens is None:
        return torch.zeros_like(t), t
    check_cu_seqlens(cu_seqlens, seq_len, 1)  # (its values are read on the host only outside torch.compile)
    bounds = cu_seqlens.to(device=device, dtype=torch.int64)
    document = torch.searchsorted(bounds, t, right=True) - 1
    return document, t - bounds[document]


__all__ = [
    "branch_counts",
    "document_mask",
    "reference_attention",
    "window_allowed",
]


def branch_counts(
    seq_len: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str = "lse",
    device: torch.device | str = "cpu",
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """``C[h, t, s]``: how many branches let query ``t`` of head ``h`` see key ``s``.

    With ``cu_seqlens`` positions, segments and offsets count from each document's start
    and no query sees another document.
    """
    check_dilated_config(segment_lengths, dilation_rates, merge)
    from .dilated import branches

    document, t = _document_positions(seq_len, cu_seqlens, device)
    same_document = document[:, None] == document[None, :]
    counts = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.float64, device=device)
    for branch in branches(segment_lengths, dilation_rates, merge, num_heads):
        same_segment = same_document & ((t[:, None] // branch.segment) == (t[None, :] // branch.segment))
        for h in range(branch.head_start, branch.head_stop):
            selected = (t % branch.rate) == (h % branch.rate)
            counts[h] += (selected[:, None] & selected[None, :] & same_segment).double()
    return counts


def document_mask(seq_len: int, cu_seqlens: torch.Tensor | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``(N, N)``: query ``t`` and key ``s`` are in the same document (all True without ``cu_seqlens``)."""
    document, _ = _document_positions(seq_len, cu_seqlens, device)
    return document[:, None] == document[None, :]


def window_allowed(seq_len: int, window_size: tuple[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``(N, N)``: query ``t`` may see key ``s`` under ``window_size = (left, right)`` (``-1``: unbounded)."""
    left, right = check_window(window_size)
    t = torch.arange(seq_len, device=device)
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= t[None, :] >= t[:, None] - left
    if right >= 0:
        allowed &= t[None, :] <= t[:, None] + right
    return allowed


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
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """SPEC.md's attention in float64, ``(B, N, H, D)`` in and out, differentiable.

    Without ``segment_lengths`` it is dense attention. ``block_layout`` (bool
    ``(H or 1, ceil(N/b), ceil(N/b))``) with ``block_size`` further restricts keys,
    and so does ``window_size`` (SPEC.md, "Sliding windows"). ``cu_seqlens``
    (``B = 1``) packs documents (SPEC.md, "Packed sequences"). A query that sees no
    key gets 0. ``return_lse`` also returns the log-sum-exp of the scores ``(B, H, N)``
    (``-inf`` for a query that sees no key; :mod:`ring_core.lse`).
    """
    q64, k64, v64 = (x.double() for x in (q, k, v))
    b, n, h, d = q64.shape
    groups = h // k64.shape[2]
    if groups > 1:
        k64 = k64.repeat_interleave(groups, dim=2)
        v64 = v64.repeat_interleave(groups, dim=2)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    if segment_lengths is None:
        counts = document_mask(n, cu_seqlens, q.device).double().expand(h, n, n)
    elif dilation_rates is None:
        raise ValueError(f"dilation_rates must be given with segment_lengths={list(segment_lengths)}")
    else:
        counts = branch_counts(n, h, segment_lengths, dilation_rates, merge, q.device, cu_seqlens=cu_seqlens)
    if tuple(window_size) != (-1, -1):
        counts = counts * window_allowed(n, window_size, q.device).double()
    if block_layout is not None:
        if block_size is None:
            raise ValueError("block_size must be given with block_layout (the layout's block size in positions)")
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
