"""Sliding windows and packed documents as geometry: which (query, key) rows of a segment a block holds.

Note: three coordinate systems.

- SPEC.md's ``window_size = (left, right)`` is in *positions*: query ``t`` sees key
  ``s`` iff ``t - left <= s <= t + right`` (``-1``: unbounded).
- Inside a dilated branch of rate ``r``, a segment's rows are every ``r``-th
  position, so the same condition on *row indices* ``i`` (query) and ``j`` (key)
  is ``i - left // r <= j <= i + right // r`` (:func:`index_window`); causality
  is the right bound ``0``.
- A kernel sees one block of ``n`` query rows and ``m`` key rows and takes the
  window in flash-attn's bottom-right-aligned convention: row ``a`` sees column
  ``b`` iff ``a + m - n - left <= b <= a + m - n + right``
  (:func:`kernel_window`). Blocks are cut so that both bounds are ``>= 0`` (every
  query row of a block sees one of its keys and every key is seen), which is what
  the kernels that take windows natively accept.

A kernel without native windows gets the window as a boolean mask
(:func:`window_mask`); the schedules then cut a segment's queries into tiles of
:func:`tile_size` rows and give each tile only the keys its window reaches
(:func:`window_tiles`), so the work follows the window, not the segment.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .kernels import KernelBackend

__all__ = [
    "NO_WINDOW",
    "covers",
    "document_spans",
    "index_window",
    "kernel_window",
    "reach",
    "tile_size",
    "window_kwargs",
    "window_mask",
    "window_tiles",
]

NO_WINDOW = (-1, -1)
# Fewest query rows of a tile: kernel calls on fewer rows cost more in overhead than the keys they skip.
MIN_TILE = 32


def index_window(window: tuple[int, int], rate: int, causal: bool) -> tuple[int, int]:
    """The window on row indices of a branch of ``rate`` (``-1``: unbounded); causal bounds the right at 0."""
    left, right = (-1 if x < 0 else x // rate for x in window)
    return left, 0 if causal else right


def reach(rows: tuple[int, int], window: tuple[int, int], bounds: tuple[int, int]) -> tuple[int, int]:
    """The key indices that query indices ``[rows)`` reach through ``window``, within ``bounds`` (may be empty)."""
    left, right = window
    low = bounds[0] if left < 0 else max(bounds[0], rows[0] - left)
    high = bounds[1] if right < 0 else min(bounds[1], rows[1] + right)
    return low, max(low, high)


def covers(rows: tuple[int, int], keys: tuple[int, int], window: tuple[int, int]) -> bool:
    """Whether every query index of ``rows`` sees every key index of ``keys`` under ``window`` (no mask needed)."""
    left, right = window
    return (left < 0 or rows[1] - 1 - left <= keys[0]) and (right < 0 or keys[1] - 1 <= rows[0] + right)


def kernel_window(rows: tuple[int, int], keys: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """The kernel window of the block (query indices ``rows``, key indices ``keys``) under the index ``window``.

    Both bounds are ``>= 0`` (or ``-1``) when every query row reaches a key and every key is reached.
    """
    left, right = window
    return (-1 if left < 0 else keys[1] - rows[1] + left), (-1 if right < 0 else rows[1] + right - keys[1])


def window_mask(n: int, m: int, window: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """Bool ``(n, m)``, True where row ``a`` sees column ``b`` under the kernel ``window`` (bottom-right aligned)."""
    diagonal = torch.arange(m, device=device)[None, :] - torch.arange(n, device=device)[:, None] - (m - n)
    left, right = window
    allowed = torch.ones(n, m, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= diagonal >= -left
    if right >= 0:
        allowed &= diagonal <= right
    return allowed


def window_kwargs(
    backend: KernelBackend,
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None,
    window: tuple[int, int] | None,
) -> dict[str, Any]:
    """``mask`` and ``window`` keywords of ``backend``'s call on the block ``(q, k)``: the window itself for a
    backend that ``supports_window``, else folded into the mask (``window`` None or ``(-1, -1)``: none)."""
    if window is None or tuple(window) == NO_WINDOW:
        return {"mask": mask}
    if backend.supports_window:
        return {"mask": mask, "window": tuple(window)}
    allowed = window_mask(q.shape[1], k.shape[1], window, q.device)
    return {"mask": allowed if mask is None else mask & allowed}


def tile_size(window: tuple[int, int]) -> int:
    """Query rows per tile: at least :data:`MIN_TILE` and the window's width, so a tile's keys are at most
    twice the keys its rows see."""
    width = max(0, window[0]) + max(0, window[1]) + 1
    return max(MIN_TILE, width)


def window_tiles(length: int, window: tuple[int, int]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``(query rows, key rows)`` of each tile of a segment of ``length`` rows under the index ``window``."""
    step = tile_size(window)
    tiles = []
    for start in range(0, length, step):
        rows = (start, min(length, start + step))
        tiles.append((rows, reach(rows, window, (0, length))))
    return tiles


def document_spans(documents: Sequence[int] | None, seq_len: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every non-empty document (``documents``: checked ``cu_seqlens`` values, or None).

    The last boundary must be ``seq_len`` (checked again here: a compiled call reads the values
    only inside the op)."""
    if documents is None:
        return [(0, seq_len)] if seq_len else []
    if documents[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at N={seq_len} (the packed length), got {documents[-1]}")
    return [(a, b) for a, b in itertools.pairwise(documents) if b > a]
