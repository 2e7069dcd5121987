"""Strips: the dilated branches as strided views, and which of their tiles a fused kernel must visit.

For branch ``(w, r)`` and offset ``o`` the selected positions ``o, o+r, ...`` of a buffer are its
**strip**: a strided view (row ``j`` of the strip is buffer row ``o + r*j``), no copy. When ``r``
divides the block size ``b``, a run of ``b/r`` strip rows lies in one layout block, so the block
layout becomes a block layout of the strip with blocks of ``b/r`` rows, and everything the branch
allows between two strips is:

    layout[h, blk(q), blk(k)]  and  seg(q) == seg(k)  and  lo <= pos(k) - pos(q) <= hi

(``[lo, hi]``: the sliding window and causality, :func:`window_bounds`; and the key not padded) with
``blk``, ``seg`` and ``pos`` read off the global positions of the rows. A fused kernel visits
**tiles** of ``tile x tile`` strip rows (FlexAttention's block): each is classified from **units**
(runs of ``min(b/r, tile)`` rows, each inside one layout block) as ``full`` (every pair allowed:
no mask evaluated), ``partial`` (some: the exact token rule above decides) or skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

FLEX_TILE = 128  # FlexAttention's block on CUDA: its default backward tiles need multiples of 128
# No bound on a side of the window: larger than any offset between positions, small enough for int32 sums.
UNBOUNDED = 1 << 30


def window_bounds(window: tuple[int, int], causal: bool) -> tuple[int, int]:
    """The allowed offsets ``pos(k) - pos(q)`` of a sliding window ``(left, right)`` (``-1``: unbounded) and
    causality, as one interval ``[lo, hi]``."""
    left, right = window
    lo = -left if left >= 0 else -UNBOUNDED
    hi = right if right >= 0 else UNBOUNDED
    return lo, min(hi, 0) if causal else hi


@dataclass(frozen=True)
class Strip:
    """Rows ``offset, offset + rate, ...`` of a buffer whose rows hold ``positions`` (global, int64, CPU)."""

    offset: int
    rate: int
    positions: torch.Tensor  # (n,) global positions of the strip's rows

    @property
    def rows(self) -> slice:
        return slice(self.offset, None, self.rate)

    def __len__(self) -> int:
        return self.positions.numel()


def strip_of(buffer_positions: torch.Tensor, offset: int, rate: int) -> Strip | None:
    """The strip of ``buffer_positions`` selected by ``(rate, offset)``; ``None`` if the buffer's rows are not
    arranged so that the selected positions are every ``rate``-th row from a fixed row (every chunk of
    the buffer must start at a multiple of ``rate``)."""
    candidates = (buffer_positions[:rate] % rate == offset).nonzero().flatten()
    if candidates.numel() == 0:
        return None
    first = int(candidates[0])
    positions = buffer_positions[first::rate]
    selected = int((buffer_positions % rate == offset).sum())
    if positions.numel() != selected or bool((positions % rate != offset).any()):
        return None
    return Strip(first, rate, positions)


@dataclass
class Tiles:
    """Which ``tile x tile`` pairs of (query strip, key strip) are full / partial, per head, and per unit pair
    whether anything is allowed (``unit_any``: what the key side must provide)."""

    full: torch.Tensor  # (h, nq_tiles, nk_tiles) bool
    partial: torch.Tensor  # (h, nq_tiles, nk_tiles) bool
    unit_any: torch.Tensor  # (h, nq_units, nk_units) bool
    unit: int
    tile: int
    needs_layout: bool  # partial tiles hold pairs of one segment that the layout forbids
    needs_segment: bool  # partial tiles hold pairs of different segments
    one_segment_units: bool  # no unit of either strip crosses a segment boundary
    needs_window: bool = False  # partial tiles hold pairs the sliding window (beyond causality) forbids
    # the rule reads the key padding, and full tiles holding a padded key are partial (per call: :func:`cut_grids`)
    padded: bool = False
    _on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def empty(self) -> bool:
        return not bool(self.full.any() or self.partial.any())

    def grids_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(full, partial)`` on ``device``, copied once (a per-call grid then costs no host-to-device copy, which
        would wait for the stream)."""
        if device not in self._on_device:
            self._on_device[device] = (self.full.to(device), self.partial.to(device))
        return self._on_device[device]


def _units(
    strip: Strip, unit: int, block_size: int, segment: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pos = strip.positions.view(-1, unit)
    first, last = pos[:, 0], pos[:, -1]
    block = first // block_size
    if bool((last // block_size != block).any()):
        raise ValueError(f"a unit of {unit} strip rows crosses a layout block of {block_size}")
    if bool((last - first != (unit - 1) * strip.rate).any()):
        raise ValueError(f"a unit of {unit} strip rows is not {unit} consecutive positions of rate {strip.rate}")
    return block, first // segment, last // segment, first, last


def classify(
    q: Strip,
    k: Strip,
    layout: torch.Tensor | None,
    *,
    block_size: int,
    segment: int,
    causal: bool,
    tile: int,
    window: tuple[int, int] = (-1, -1),
    padded: bool = False,
) -> Tiles:
    """Classify the tiles of ``q x k`` under ``layout`` (bool ``(h or 1, nb, nb)`` for the call's heads, or
    ``None``: every block), segments of ``segment`` positions, causality and the sliding ``window``; tiles no
    window reaches are skipped. ``padded``: the call has a key padding mask (:func:`cut_grids`)."""
    unit = min(tile, max(1, block_size // q.rate))
    if tile % unit or len(q) % tile or len(k) % tile:
        raise ValueError(f"strips of {len(q)} and {len(k)} rows do not split into tiles of {tile} (units {unit})")
    qb, qs0, qs1, qp0, qp1 = _units(q, unit, block_size, segment)
    kb, ks0, ks1, kp0, kp1 = _units(k, unit, block_size, segment)
    if layout is None:
        lay = torch.ones(1, qb.numel(), kb.numel(), dtype=torch.bool)
    else:
        lay = layout.cpu()[:, qb][:, :, kb]
    seg_any = (qs0[:, None] <= ks1[None, :]) & (ks0[None, :] <= qs1[:, None])
    seg_all = ((qs0 == qs1)[:, None] & (ks0 == ks1)[None, :]) & (qs0[:, None] == ks0[None, :])
    # offsets pos(k) - pos(q) of a unit pair: every multiple of the rate from d_lo to d_hi
    d_lo, d_hi = kp0[None, :] - qp1[:, None], kp1[None, :] - qp0[:, None]
    win_any, win_all = _offsets_within(d_lo, d_hi, q.rate, window_bounds(window, causal))
    any_ = lay & seg_any & win_any
    all_ = lay & seg_all & win_all
    g, h = tile // unit, any_.shape[0]
    shape = (h, len(q) // tile, g, len(k) // tile, g)
    full = all_.reshape(shape).all(4).all(2)
    partial = any_.reshape(shape).any(4).any(2) & ~full
    # which terms of the token rule can matter inside partial tiles
    near = partial.repeat_interleave(g, 1).repeat_interleave(g, 2) & win_any
    needs_segment = bool((near & ~seg_all).any())
    needs_layout = bool((near & ~lay & seg_any).any())
    # the window's own cuts: its right side adds nothing to causality
    _, window_all = _offsets_within(d_lo, d_hi, q.rate, window_bounds((window[0], -1) if causal else window, False))
    needs_window = bool((near & ~window_all).any())
    one_segment = bool((qs0 == qs1).all() and (ks0 == ks1).all())
    return Tiles(full, partial, any_, unit, tile, needs_layout, needs_segment, one_segment, needs_window, padded)


def _offsets_within(
    d_lo: torch.Tensor, d_hi: torch.Tensor, rate: int, bounds: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether some / every offset ``d_lo, d_lo + rate, ..., d_hi`` lies in ``bounds``."""
    lo, hi = bounds
    first = d_lo + (lo - d_lo).clamp(min=0).add(rate - 1).div(rate, rounding_mode="floor") * rate
    return first <= d_hi.clamp(max=hi), (d_lo >= lo) & (d_hi <= hi)


def _padded(
    full: torch.Tensor, partial: torch.Tensor, pad: torch.Tensor, tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    columns = pad.unflatten(-1, (-1, tile))  # (..., B, key tiles, tile)
    some, every = columns.any(-1).any(-2)[..., None, None, :], columns.all(-1).all(-2)[..., None, None, :]
    kept = full & ~some
    return kept, (full | partial) & ~every & ~kept


def _segment_spans(ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per tile (last dim of ``ids``): the smallest and largest segment id of its served rows, whether every row
    is served and whether any is (ids below 0: not served)."""
    served = ids >= 0
    first = torch.where(served, ids, torch.iinfo(ids.dtype).max).amin(-1)
    last = torch.where(served, ids, -1).amax(-1)
    return first, last, served.all(-1), served.any(-1)


def cut_grids(
    full: torch.Tensor,
    partial: torch.Tensor,
    tile: int,
    pad: torch.Tensor | None = None,
    segments: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's ``(full, partial)`` grids ``(..., h, rows, cols)`` under per-call segment ids ``segments`` (int
    ``(..., nq)`` and ``(..., nk)`` over the strips' rows, non-decreasing where not negative, negative for rows the
    call does not serve: packed documents, whose segments the plan cannot know) and the key padding ``pad`` (bool
    ``(..., B, nk)`` over the key strip's rows); on the device of the grids, no host sync; leading dims batch calls
    of one shape. With ``segments`` a full tile stays full only when all its rows are served and in one segment,
    and a tile whose query and key rows cannot share a segment is skipped. With ``pad`` a full tile holding a
    padded key of any batch element is partial (the rule reads the padding there), and a tile whose keys are
    padded in every batch element is skipped."""
    if segments is not None:
        (q0, q1, q_all, q_any), (k0, k1, k_all, k_any) = (_segment_spans(x.unflatten(-1, (-1, tile))) for x in segments)
        same = (
            (q_all & (q0 == q1))[..., :, None]
            & (k_all & (k0 == k1))[..., None, :]
            & (q0[..., None] == k0[..., None, :])
        )
        meet = q_any[..., :, None] & k_any[..., None, :] & (q0[..., None] <= k1[..., None, :])
        meet &= k0[..., None, :] <= q1[..., None]
        full, partial = full & same[..., None, :, :], (full | partial) & meet[..., None, :, :]
        partial &= ~full
    return (full, partial) if pad is None else _padded(full, partial, pad, tile)


def block_lists(mask: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A bool tile grid ``(h, rows, cols)`` as kernels' block lists: counts ``(1, h, rows)`` and each row's allowed
    columns in ascending order, packed left, ``(1, h, rows, cols)`` (int32, on ``device``; contiguous, as
    flash-attn 4 requires, also for a transposed grid). Grids of a batch ``(m, h, rows, cols)`` give ``(m, h, ...)``."""
    counts = mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    if mask.dim() == 3:
        counts, indices = counts[None], indices[None]
    return counts.to(device).contiguous(), indices.to(device).contiguous()


def needed_rows(tiles_and_strips: Iterable[tuple[Tiles, Strip]], buffer_len: int) -> torch.Tensor:
    """Sorted buffer rows that some allowed pair of these calls reads: ``[(tiles, key strip), ...]``."""
    need = torch.zeros(buffer_len, dtype=torch.bool)
    for tiles, k in tiles_and_strips:
        units = tiles.unit_any.any(0).any(0)
        rows = torch.arange(len(k)).view(-1, tiles.unit)[units].flatten()
        need[k.offset + k.rate * rows] = True
    return need.nonzero().flatten()


def runs(tiles: Tiles, q: Strip, k: Strip, causal: bool) -> int | None:
    """The run length (strip rows) when every allowed pair is "same run of the strip" (the strip cut into equal
    consecutive runs, the last maybe shorter) and every such pair is allowed (with ``causal``, every such pair
    causality allows): then a dense kernel over segments of that length, causal when the call is, computes it
    exactly. ``None`` otherwise (a layout whose blocks are lower triangular in a call that is not causal too)."""
    if tiles.needs_window or tiles.padded:
        return None
    if not tiles.one_segment_units or len(q) != len(k) or not torch.equal(q.positions, k.positions):
        return None
    a = tiles.unit_any
    if a.shape[0] > 1 and not bool((a == a[:1]).all()):
        return None
    a = a[0]
    n = a.shape[0]
    first = a.int().argmax(1)
    if not bool(a.any(1).all()):
        return None
    run = first[:, None] == first[None, :]
    lower = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    if not torch.equal(a, run & lower if causal else run):
        return None
    if not bool((first <= torch.arange(n)).all()) or not bool((first[1:] >= first[:-1]).all()):
        return None
    _, lengths = torch.unique_consecutive(first, return_counts=True)
    length = int(lengths[0])
    if bool((lengths[:-1] != length).any()) or int(lengths[-1]) > length:
        return None
    return length * tiles.unit
