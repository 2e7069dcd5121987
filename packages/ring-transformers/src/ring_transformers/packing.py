"""Packed batches: document boundaries from ``position_ids`` (transformers' ``DataCollatorWithFlattening``).

A packed batch is one row (``B = 1``) holding several documents back to back;
each document's ``position_ids`` count from 0, so a document starts wherever the
position is 0 (and at the first token). The boundaries are flash-attn's
``cu_seqlens``: ``[0, c_1, ..., N]``, what ring-core's ``forward(..., cu_seqlens=...)``
takes (SPEC.md, "Packed sequences").
"""

from __future__ import annotations

import torch


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, flatten_rows: bool = False) -> torch.Tensor | None:
    """``cu_seqlens`` (int32, ``[0, ..., N]``) of a packed row, or None when no position restarts at 0.

    ``position_ids`` is ``(B, N)`` (or ``(N,)``). A restart at 0 after the first token
    starts a new document. Rows without a restart are one sequence each (any ``B``,
    any starting position). A restart needs ``B = 1`` (flash-attn's convention), else
    a ``ValueError``; with ``flatten_rows=True`` the rows are laid end to end instead
    (every row starts a document) and the result indexes those ``B * N`` positions.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
        raise TypeError(f"position_ids must be an integer tensor, got {position_ids!r}")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must have shape (B, N) or (N,), got {tuple(position_ids.shape)}")
    starts = position_ids == 0
    starts[:, 0] = True
    if not bool(starts[:, 1:].any()):
        return None
    if position_ids.shape[0] != 1 and not flatten_rows:
        raise ValueError(
            "a packed batch (position_ids restarting at 0 inside a row) must have batch size 1 "
            f"(flash-attn's convention): got position_ids of shape {tuple(position_ids.shape)}; "
            "pack all documents into one row, or pass position_ids that do not restart"
        )
    edges = torch.nonzero(starts.flatten()).flatten()
    return torch.cat([edges, edges.new_full((1,), starts.numel())]).to(torch.int32)


def traced_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` of the ``(B, N)`` rows laid end to end, of the fixed length ``B * N + 1``, read on no host.

    What :func:`cu_seqlens_from_position_ids` gives with ``flatten_rows=True`` (every row starting a
    document), for ``torch.compile``: where no document starts, the last start repeats (empty documents,
    which attend nothing and which ring-core's op drops; one document of the whole sequence is no packing).
    """
    return cu_seqlens_of_starts(position_ids == 0, traced=True)


def cu_seqlens_of_starts(starts: torch.Tensor, *, traced: bool) -> torch.Tensor:
    """``cu_seqlens`` of the ``(B, N)`` rows laid end to end, a document starting wherever the bool ``starts``
    holds and at each row's first token; ``traced``: of the fixed length ``B * N + 1``, as :func:`traced_cu_seqlens`."""
    starts = torch.cat([torch.ones_like(starts[:, :1]), starts[:, 1:]], dim=1).flatten()
    index = torch.arange(starts.numel(), device=starts.device)
    edges = torch.cummax(torch.where(starts, index, 0), dim=0).values if traced else index[starts]
    return torch.cat([edges, index.new_full((1,), starts.numel())]).to(torch.int32)
