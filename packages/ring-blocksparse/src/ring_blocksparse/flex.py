"""FlexAttention on strips: one fused block-sparse kernel per dilated branch offset (a batch of them per call at
batch 1: :class:`BatchRule`, :mod:`ring_blocksparse.batches`).

Each branch offset is a strided view of ``q, k, v`` (:mod:`ring_blocksparse.strips`), and what it
allows is a ``BlockMask`` over that view: full tiles skip the mask, partial tiles evaluate the
exact token rule (layout block, segment, sliding window and causality, key padding; the layout and
the padding only where they can matter), and empty tiles are never visited. The rule reads small
per-row tensors captured by a closure of one code object, so a new layout, window, padding or
sequence never recompiles; each strip shape does, once per variant (layout read or not, padding
read or not).
Outputs come with their log-sum-exp, so branches (and ring steps) merge exactly. On CUDA a rule leaves the layout
to the block mask where a tile lies in one layout block, so the calls must run fused (FlexAttention unfused obeys
only the rule): :func:`compiled_flex` compiles them whole and past dynamo's recompile limits, and :func:`flex_reasons`
keeps the strips off CUDA calls where dynamo would not compile (:func:`unfused_reasons`).

Kernel options (``flex_attention(kernel_options=...)``): the block mask says which flags
are safe (:func:`safe_flags`: ``ROWS_GUARANTEED_SAFE`` when every query row has an allowed
key in the first tile the kernel visits for it, ``BLOCKS_ARE_CONTIGUOUS`` when every row's
and column's blocks are one run, e.g. a band), :data:`TUNED_OPTIONS` holds tile shapes
measured on Hopper, and the caller's ``kernel_options`` override both.

Block tiles (:func:`block_tile`, :func:`finer`). A strip of rate ``r`` holds ``block_size / r`` rows of each
layout block, so a 128-row tile spans ``r`` layout blocks per side and is visited when any of its ``r x r``
blocks is kept: under a scattered layout (10% ``random``) that is 34% of the tiles at rate 2 and 81% at rate 4.
On CUDA a call of such a strip takes tiles of one layout block (32 or 64 rows) when they visit at most
:data:`FINE_SHARE` of the pairs the 128-row tiles do, with :func:`tile_options` for the kernels; a band keeps
its 128-row tiles (and flash-attn 4), which visit about as much.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import lcm
from typing import TYPE_CHECKING, Any

import torch

from .strips import FLEX_TILE, Strip, Tiles, block_lists, cut_grids, window_bounds

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

# A FlexAttention ``mask_mod``: (batch, head, query index, key index) -> allowed.
_MaskMod = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# per-call segment ids of a call's query and key strip rows (packed documents)
_Segments = tuple[torch.Tensor, torch.Tensor]
# a rule's tensors, as its ``mask_mod`` reads them (:meth:`StripRule.mask_parts`): None where a term is not read
_Parts = tuple[torch.Tensor | None, ...]

_COMPILED: dict[str, Any] = {}

# Tile shapes and pipelining for the fused kernels, by (compute capability major, dtype, head dim);
# missing entries keep FlexAttention's own defaults. Only the forward is tuned: no backward tiling
# swept beat the default (docs/benchmarks/blocksparse-sweep-h200.json has the sweep of
# tools/bench/blocksparse.py --sweep). USE_TMA is experimental, so it is left to the caller
# (flex_kernel_options).
TUNED_OPTIONS: dict[tuple[int, torch.dtype, int], dict[str, Any]] = {
    (9, torch.bfloat16, 128): {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 3},
}
# Block tiles (module docstring): the strip rows of one layout block that a kernel tile may be, and the share of the
# 128-row tiles' visited pairs below which a call takes them (FlexAttention at 32/64 rows computes each pair
# at a higher cost than at 128; the changelog has the measurement).
BLOCK_TILES = (32, 64)
FINE_SHARE = 0.5
BLOCK_TILES_ENV = "RING_BLOCKSPARSE_BLOCK_TILES"  # "0": every CUDA call keeps 128-row tiles (for A/B timing)
# Options whose value is a bool / a positive int (anything else is passed through unchecked).
_BOOL_OPTIONS = ("PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "USE_TMA")


def _flex_attention() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_reasons(
    q: torch.Tensor,
    *,
    world_size: int,
    chunk: int,
    dilation_rates: Sequence[int],
    block_size: int,
    dropout_p: float,
    needs_grad: bool = False,
) -> list[str]:
    """Why the strip path cannot run this call (empty: it can). ``chunk``: the length of the contiguous
    runs of the sequence a rank holds (the whole sequence on one process)."""
    reasons = []
    try:
        _flex_attention()
    except ImportError:
        reasons.append(f"this torch ({torch.__version__}) has no FlexAttention")
    if dropout_p > 0:
        reasons.append("dropout")
    for rate in sorted(set(dilation_rates)):
        if block_size % rate:
            reasons.append(f"dilation rate {rate} does not divide block_size {block_size}")
            continue
        tile = tile_for(q.device, block_size, rate)
        unit = block_size // rate
        if tile % unit and unit % tile:
            reasons.append(f"block_size {block_size} / rate {rate} = {unit} rows and the kernel's tile {tile} nest")
        elif chunk % (rate * tile):
            where = f"N={chunk}" if world_size == 1 else f"each shard's chunk ({chunk} rows)"
            reasons.append(f"{where} is not a multiple of rate {rate} x tile {tile}")
    if q.device.type == "cuda" and q.dtype == torch.float64:
        reasons.append("float64 on CUDA")
    if q.device.type == "cuda":
        reasons += unfused_reasons()
    if q.device.type != "cuda" and needs_grad:
        reasons.append(f"FlexAttention has no backward on {q.device.type}")
    return reasons


def unfused_reasons() -> list[str]:
    """Why ``torch.compile`` would run FlexAttention unfused here (empty: it compiles). The unfused form obeys only a
    call's ``mask_mod``, and on CUDA a strip rule leaves the layout to the block mask (:func:`call_mask_parts`), so
    the strips must not run it there."""
    reasons = []
    if torch._dynamo.config.disable or os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        reasons.append("torch.compile is disabled (TORCHDYNAMO_DISABLE=1 or TORCH_COMPILE_DISABLE=1)")
    stance = getattr(getattr(torch._dynamo.eval_frame, "_stance", None), "stance", "default")
    if stance not in ("default", "fail_on_recompile"):
        reasons.append(f"torch.compiler.set_stance({stance!r}) runs compiled functions eagerly")
    return reasons


def strip_length(n: int, device: torch.device, block_size: int, dilation_rates: Sequence[int]) -> int:
    """The least length ``>= n`` that every rate's strips split into whole kernel tiles (``rate x tile``; rates that
    do not divide ``block_size`` are left out: the strips cannot take them at any length)."""
    multiple = lcm(1, *(rate * tile_for(device, block_size, rate) for rate in dilation_rates if block_size % rate == 0))
    return -(-n // multiple) * multiple


def tile_for(device: torch.device, block_size: int, rate: int) -> int:
    """The BlockMask block in strip rows: :data:`FLEX_TILE` on CUDA (the fused kernel's tile), elsewhere one
    layout block of the strip (the eager kernel evaluates the rule everywhere anyway)."""
    return FLEX_TILE if device.type == "cuda" else max(1, block_size // rate)


def block_tile(device: torch.device, block_size: int, rate: int, user: dict[str, Any] | None) -> int | None:
    """The block tile a CUDA call of this rate may take instead of :data:`FLEX_TILE` (None: none; also when the
    caller's ``flex_kernel_options`` set the kernels' tiles, or with ``RING_BLOCKSPARSE_BLOCK_TILES=0``)."""
    unit = block_size // rate
    user_tiles = any(_option_base(key).startswith("BLOCK_") for key in user or {})
    off = user_tiles or os.environ.get(BLOCK_TILES_ENV, "1") == "0"
    return unit if device.type == "cuda" and unit in BLOCK_TILES and not off else None


def finer(coarse: Tiles, fine: Tiles) -> Tiles:
    """``fine`` when its tiles visit at most :data:`FINE_SHARE` of the pairs ``coarse``'s do, else ``coarse``."""

    def visited(tiles: Tiles) -> int:
        return int((tiles.full | tiles.partial).sum()) * tiles.tile**2

    return fine if visited(fine) <= FINE_SHARE * visited(coarse) else coarse


def tile_options(tile: int) -> dict[str, Any]:
    """The kernels' tiles for a block mask of ``tile``-row blocks below :data:`FLEX_TILE` (every kernel tile one block)."""
    sides = {"fwd_": ("BLOCK_M", "BLOCK_N"), "bwd_": ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}
    options: dict[str, Any] = {prefix + name: tile for prefix, names in sides.items() for name in names}
    for prefix in sides:
        options.update({prefix + "num_warps": 4, prefix + "num_stages": 3})
    return options


def _one_run(mask: torch.Tensor) -> bool:
    """Whether the True entries of every row of ``mask`` (..., n, m) form at most one run."""
    starts = mask.clone()
    starts[..., 1:] &= ~mask[..., :-1]
    return bool((starts.sum(-1) <= 1).all())


def safe_flags(full: torch.Tensor, partial: torch.Tensor, diagonal_only: bool = False) -> dict[str, bool]:
    """The FlexAttention flags this block mask makes safe (``full``/``partial``: bool (H, nq, nk)).

    ``ROWS_GUARANTEED_SAFE``: the kernel skips its guard for a query row with no key yet, so every
    row must find a key in the first tile it visits: the partial tiles come first, in ascending
    order, then the full ones. Safe where a row of tiles has no partial tile and some full tile,
    or (``diagonal_only``: partial tiles are causal diagonal tiles of one strip, which hold the
    query itself) where its first partial tile is the diagonal one. ``BLOCKS_ARE_CONTIGUOUS``:
    the kernels step to the next block without reading the index list, so every row's full and
    partial blocks, and every column's (the backward walks columns), must be one run each.
    """
    has_partial = partial.any(-1)
    safe = ~has_partial & full.any(-1)
    if diagonal_only and full.shape[-1] == full.shape[-2]:
        first_partial = partial.to(torch.int8).argmax(-1)
        safe |= has_partial & (first_partial == torch.arange(partial.shape[-2]))
    rows_safe = bool(safe.all())
    contiguous = all(_one_run(m) and _one_run(m.transpose(-1, -2)) for m in (full, partial))
    return {"ROWS_GUARANTEED_SAFE": rows_safe, "BLOCKS_ARE_CONTIGUOUS": contiguous}


def check_kernel_options(options: Any) -> dict[str, Any]:
    """Validate the user's ``flex_kernel_options`` (a dict of FlexAttention options; ``fwd_``/``bwd_`` prefixes)."""
    if options is None:
        return {}
    if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
        raise TypeError(f"flex_kernel_options must be a dict of FlexAttention option names to values, got {options!r}")
    known = _documented_options()
    for key, value in options.items():
        base = _option_base(key)
        if known and base not in known:
            raise ValueError(
                f"flex_kernel_options[{key!r}] is not a FlexAttention kernel option of this torch ({torch.__version__});"
                f" known: {sorted(known)} (each also with a fwd_ or bwd_ prefix)"
            )
        if base in _BOOL_OPTIONS and not isinstance(value, bool):
            raise ValueError(f"flex_kernel_options[{key!r}] must be a bool, got {value!r}")
        if (base.startswith("BLOCK_") or base in ("num_warps", "num_stages")) and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"flex_kernel_options[{key!r}] must be a positive int, got {value!r}")
        if base.startswith("BLOCK_") and (value & (value - 1) or FLEX_TILE % value):
            raise ValueError(f"flex_kernel_options[{key!r}] must be a power of two dividing {FLEX_TILE}, got {value}")
    return dict(options)


def _option_base(key: str) -> str:
    """A kernel option's name without its ``fwd_``/``bwd_`` prefix."""
    return key.removeprefix("fwd_").removeprefix("bwd_")


def _documented_options() -> frozenset[str]:
    """The option names of this torch's ``FlexKernelOptions`` (empty where it has none: nothing is checked)."""
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
    except ImportError:
        return frozenset()
    return frozenset(FlexKernelOptions.__annotations__)


def kernel_options_for(
    q: torch.Tensor, flags: dict[str, bool], user: dict[str, Any] | None, tuned: bool = True, tile: int = FLEX_TILE
) -> dict[str, Any] | None:
    """What to pass as ``kernel_options``: safe flags, then the tiles (``tile``: the block mask's; below
    :data:`FLEX_TILE`, :func:`tile_options`; else, with ``tuned``, tuned tiles for this GPU), then ``user``.

    The tuned forward tiles were measured with rules that read no layout; with the layout read inside
    partial tiles they need more shared memory than a Hopper SM has (H200, D=128), so such calls keep
    FlexAttention's own tiles (``tuned=False``), and so do calls that read the key padding (not
    measured with it)."""
    if q.device.type != "cuda":
        return None  # the eager (CPU) path takes none
    major = torch.cuda.get_device_capability(q.device)[0]
    options = {key: True for key, on in flags.items() if on}
    if tile < FLEX_TILE:
        options.update(tile_options(tile))
    elif tuned:
        options.update(TUNED_OPTIONS.get((major, q.dtype, q.shape[-1]), {}))
    options.update(user or {})
    return options or None


class StripRule:
    """The exact token rule of one strip call, over per-row tensors (layout block, segment, position).

    :meth:`mask_mod` checks segment, window and causality always (cheap per-row reads; the window and
    causality are one interval of offsets, :func:`~ring_blocksparse.strips.window_bounds`, held in
    tensors), the layout (a read per pair) only where asked (the fused kernel asks it only inside
    partial tiles) and the key padding (a ``(B, nk)`` read per key, per call) when given: those
    two terms are the variants that compile apart. :meth:`dense` evaluates it on the whole grid.
    """

    def __init__(
        self,
        q: Strip,
        k: Strip,
        layout: torch.Tensor | None,
        *,
        block_size: int,
        segment: int,
        causal: bool,
        device: torch.device,
        window: tuple[int, int] = (-1, -1),
    ) -> None:
        def rows(strip: Strip) -> tuple[torch.Tensor, ...]:
            pos = strip.positions
            return tuple(x.to(device=device, dtype=torch.int32) for x in (pos // block_size, pos // segment, pos))

        self.qblk, self.qseg, self.qpos = rows(q)
        self.kblk, self.kseg, self.kpos = rows(k)
        self.layout = None if layout is None else layout.to(device)
        self.causal = causal
        self.lo, self.hi = (torch.tensor(x, dtype=torch.int32, device=device) for x in window_bounds(window, causal))
        self.same_strip = torch.equal(q.positions, k.positions)

    def mask_mod(
        self, layout: bool = True, pad: torch.Tensor | None = None, segments: _Segments | None = None
    ) -> _MaskMod:
        """A ``mask_mod``: segment, window and causality, (if asked and there is one) the layout, and (when given)
        the key padding ``pad`` (bool ``(B, nk)`` over the key strip's rows, ``True``: padded); ``segments``: the
        rows' segment ids of this call instead of the plan's (packed documents, :func:`document_segments`)."""
        return _rule_of(*self.mask_parts(layout, pad, segments))

    def mask_parts(
        self, layout: bool = True, pad: torch.Tensor | None = None, segments: _Segments | None = None
    ) -> tuple[Callable[..., torch.Tensor], _Parts]:
        """:meth:`mask_mod` as a function of ``(b, h, q_idx, kv_idx, *parts)`` and its ``parts`` (tensors, None
        where a term is not read)."""
        qseg, kseg = (self.qseg, self.kseg) if segments is None else segments
        lay = self.layout if layout else None
        return _token_rule, (self.qblk, self.kblk, qseg, kseg, self.qpos, self.kpos, self.lo, self.hi, lay, pad)

    def dense(
        self, heads: int, layout: bool = True, pad: torch.Tensor | None = None, segments: _Segments | None = None
    ) -> torch.Tensor:
        """Bool ``(B or 1, heads or 1, nq, nk)``: the rule on every pair."""
        per_head = self.layout is not None and self.layout.shape[0] > 1
        batch = 1 if pad is None else pad.shape[0]
        return _every_pair(self.mask_mod(layout, pad, segments), batch, heads if per_head else 1, self.qpos, self.kpos)


class BatchRule:
    """The rules of a batch of strip calls (:class:`~ring_blocksparse.batches.StripBatch`) as one: their per-row
    tensors stacked, batch ``b`` of the kernel reading call ``b``'s (its layout and padding too)."""

    def __init__(self, rules: Sequence[StripRule]) -> None:
        first = rules[0]
        names = ("qblk", "kblk", "qseg", "kseg", "qpos", "kpos")
        self.qblk, self.kblk, self.qseg, self.kseg, self.qpos, self.kpos = (
            torch.stack([getattr(r, name) for r in rules]) for name in names
        )
        self.layout = None if first.layout is None else torch.stack([r.layout for r in rules])  # type: ignore[misc]
        self.causal, self.lo, self.hi = first.causal, first.lo, first.hi
        self.same_strip = all(r.same_strip for r in rules)

    def mask_mod(
        self, layout: bool = True, pad: torch.Tensor | None = None, segments: _Segments | None = None
    ) -> _MaskMod:
        """:meth:`StripRule.mask_mod` of each call, on its batch (``pad``: ``(m, nk)``; ``segments``: ``(m, n)`` each)."""
        return _rule_of(*self.mask_parts(layout, pad, segments))

    def mask_parts(
        self, layout: bool = True, pad: torch.Tensor | None = None, segments: _Segments | None = None
    ) -> tuple[Callable[..., torch.Tensor], _Parts]:
        """:meth:`StripRule.mask_parts` of the batch."""
        qseg, kseg = (self.qseg, self.kseg) if segments is None else segments
        lay = self.layout if layout else None
        return _batched_token_rule, (self.qblk, self.kblk, qseg, kseg, self.qpos, self.kpos, self.lo, self.hi, lay, pad)

    def dense(
        self, heads: int, layout: bool = True, pad: torch.Tensor | None = None, segments: _Segments | None = None
    ) -> torch.Tensor:
        """Bool ``(m, heads or 1, nq, nk)``: each call's rule on every pair."""
        per_head = self.layout is not None and self.layout.shape[1] > 1
        rule = self.mask_mod(layout, pad, segments)
        return _every_pair(rule, self.qpos.shape[0], heads if per_head else 1, self.qpos[0], self.kpos[0])


def _every_pair(rule: _MaskMod, batch: int, heads: int, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """A ``mask_mod`` evaluated on every (batch, head, query row, key row): bool ``(batch, heads, nq, nk)``."""
    n, m, device = qpos.numel(), kpos.numel(), qpos.device
    b, h = torch.arange(batch, device=device), torch.arange(heads, device=device)
    q_idx, kv_idx = torch.arange(n, device=device), torch.arange(m, device=device)
    return rule(b[:, None, None, None], h[:, None, None], q_idx[:, None], kv_idx).expand(batch, heads, n, m)


def _rule_of(rule: Callable[..., torch.Tensor], parts: _Parts) -> _MaskMod:
    # One code object for every call (dynamo matches closures by code; the tensors are graph inputs),
    # so only the shapes and whether the layout and the padding are read make separate compiled kernels.
    def mask_mod(b: Any, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return rule(b, h, q_idx, kv_idx, *parts)

    return mask_mod


def _token_rule(
    b: Any,
    h: torch.Tensor,
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
    qblk: torch.Tensor,
    kblk: torch.Tensor,
    qseg: torch.Tensor,
    kseg: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    lay: torch.Tensor | None,
    pad: torch.Tensor | None,
) -> torch.Tensor:
    """:meth:`StripRule.mask_mod`'s rule, its tensors as arguments (:meth:`StripRule.mask_parts`)."""
    offset = kpos[kv_idx] - qpos[q_idx]
    ok = (qseg[q_idx] == kseg[kv_idx]) & (offset >= lo) & (offset <= hi)
    if lay is not None:
        ok = ok & lay[h % lay.shape[0], qblk[q_idx], kblk[kv_idx]]
    if pad is not None:
        ok = ok & ~pad[b, kv_idx]
    return ok


def _batched_token_rule(
    b: Any,
    h: torch.Tensor,
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
    qblk: torch.Tensor,
    kblk: torch.Tensor,
    qseg: torch.Tensor,
    kseg: torch.Tensor,
    qpos: torch.Tensor,
    kpos: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    lay: torch.Tensor | None,
    pad: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`_token_rule` with every per-row tensor and the layout read at the batch index (a single call's
    tensors serve every batch element instead, so the two cannot share one function)."""
    offset = kpos[b, kv_idx] - qpos[b, q_idx]
    ok = (qseg[b, q_idx] == kseg[b, kv_idx]) & (offset >= lo) & (offset <= hi)
    if lay is not None:
        ok = ok & lay[b, h % lay.shape[1], qblk[b, q_idx], kblk[b, kv_idx]]
    if pad is not None:
        ok = ok & ~pad[b, kv_idx]
    return ok


def int32_on(values: Any, device: torch.device) -> torch.Tensor:
    """``values`` as an int32 tensor on ``device``, copied without waiting for the device's queued work (a blocking
    copy to a GPU synchronizes its stream; pageable memory is staged at once, so the source may go)."""
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


def document_segments(
    positions: torch.Tensor,
    bounds: torch.Tensor,
    segment: int | torch.Tensor,
    rate: int | torch.Tensor = 1,
    phase: int | torch.Tensor = 0,
    outside: int = -1,
) -> torch.Tensor:
    """Segment ids of a strip's ``positions`` (int32, on the bounds' device) in packed documents: segments restart
    at every document (``bounds``: the ``cu_seqlens`` values, int32, same device), so the id is the document's
    start plus the segment's number inside it (distinct across documents, non-decreasing along the positions).
    A call of rate ``rate`` serves the documents starting at ``phase`` modulo the rate; the rows of other
    documents get ``outside`` (negative; queries and keys pass different values, so they never match).
    ``segment``, ``rate`` and ``phase`` may be tensors broadcasting with ``positions`` (calls batched)."""
    start = bounds[torch.searchsorted(bounds, positions, right=True) - 1]
    ids = start + torch.div(positions - start, segment, rounding_mode="floor")
    return ids if isinstance(rate, int) and rate == 1 else torch.where(start % rate == phase, ids, outside)


@dataclass
class Cut:
    """A call's tiles and rule inputs known only per call (key padding, packed documents): its ``(full, partial)``
    grids, their block lists (:func:`tile_cut`'s order), the padding ``(B, nk)`` and the segment ids it reads."""

    full: torch.Tensor
    partial: torch.Tensor
    lists: tuple[torch.Tensor, ...]  # kv and full kv counts and indices, then the same for the transposed grids
    pad: torch.Tensor | None = None
    segments: _Segments | None = None

    def select(self, index: int) -> Cut:
        """The ``index``-th call of a cut batched over calls of one shape (:func:`call_cuts`)."""
        return Cut(
            self.full[index], self.partial[index], tuple(x[index : index + 1] for x in self.lists),
            None if self.pad is None else self.pad[index],
            None if self.segments is None else (self.segments[0][index], self.segments[1][index]),
        )  # fmt: skip

    def take(self, start: int, stop: int) -> Cut:
        """Calls ``start`` to ``stop`` of a batched cut, as the cut of their :class:`~ring_blocksparse.batches.StripBatch`
        (batch 1 each: the padding ``(m, nk)``)."""
        return Cut(
            self.full[start:stop], self.partial[start:stop], tuple(x[start:stop] for x in self.lists),
            None if self.pad is None else self.pad[start:stop, 0],
            None if self.segments is None else (self.segments[0][start:stop], self.segments[1][start:stop]),
        )  # fmt: skip


def tile_cut(
    full: torch.Tensor,
    partial: torch.Tensor,
    tile: int,
    pad: torch.Tensor | None = None,
    segments: _Segments | None = None,
) -> Cut:
    """The :class:`Cut` of plan grids ``(..., h, rows, cols)`` under ``pad`` and ``segments`` (:func:`cut_grids`;
    leading dims batch calls of one shape), with the forward's and the backward's block lists."""
    full, partial = cut_grids(full, partial, tile, pad, segments)
    # the backward's lists (per key tile) by the same sort of the transposed grids: FlexAttention's own
    # transpose goes through a vmapped dense scatter, whose dispatch cost dominated masks built per call
    grids = (partial, full, partial.transpose(-2, -1), full.transpose(-2, -1))
    lists = tuple(x for grid in grids for x in block_lists(grid, full.device))
    return Cut(full, partial, lists, pad, segments)


def call_cuts(units: Sequence[Any], pad: torch.Tensor | None, documents: torch.Tensor | None) -> list[Cut | None]:
    """Each unit's :class:`Cut` (a call's, or a :class:`~ring_blocksparse.batches.StripBatch`'s: its calls' cuts
    together) under the key buffer's padding ``pad`` (bool ``(B, rows)``) and packed ``documents`` (``cu_seqlens``
    int32), both on the device (None each: no cut, the plan's block masks serve). Built for all calls of one
    shape at once: per call, the dozens of small tensor ops cost more to launch than to run."""
    cuts: list[Cut | None] = [None] * len(units)
    if pad is None and documents is None:
        return cuts
    device = pad.device if pad is not None else documents.device  # type: ignore[union-attr]
    members_of = [getattr(unit, "calls", [unit]) for unit in units]  # a batch's calls, or the call itself
    calls = [call for members in members_of for call in members]
    owner = [index for index, members in enumerate(members_of) for _ in members]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, call in enumerate(calls):
        if call.run is None:  # (dense calls have neither padding nor documents)
            groups.setdefault((len(call.q), len(call.k), call.tiles.tile, call.tiles.full.shape), []).append(index)
    for members in groups.values():
        group = [calls[i] for i in members]
        segments = None
        if documents is not None:
            params = int32_on([(c.segment, c.q.rate, c.phase) for c in group], device)
            segment, rate, phase = params.T[..., None]
            segments = (
                document_segments(torch.stack([c.rule.qpos for c in group]), documents, segment, rate, phase, -1),
                document_segments(torch.stack([c.rule.kpos for c in group]), documents, segment, rate, phase, -2),
            )
        pads = None if pad is None else torch.stack([pad[:, c.k.rows] for c in group])
        full, partial = (torch.stack(grids) for grids in zip(*(c.tiles.grids_on(device) for c in group)))
        batch = tile_cut(full, partial, group[0].tiles.tile, pads, segments)
        # a batch's calls are consecutive here (one shape, in order): its cut is theirs, together
        for position, index in enumerate(members):
            unit = owner[index]
            if cuts[unit] is None:
                size = len(members_of[unit])
                cuts[unit] = batch.select(position) if size == 1 else batch.take(position, position + size)
    return cuts


def call_mask_parts(
    tiles: Tiles, rule: StripRule | BatchRule, device: torch.device, cut: Cut | None = None
) -> tuple[Callable[..., torch.Tensor], _Parts]:
    """The rule a call's block mask evaluates (:meth:`StripRule.mask_parts`), under its :class:`Cut` if any."""
    # the fused kernel asks the rule only inside partial tiles; the eager one ignores the tiles
    layout = tiles.needs_layout or device.type != "cuda"
    return rule.mask_parts(layout) if cut is None else rule.mask_parts(layout, cut.pad, cut.segments)


def strip_block_mask(
    tiles: Tiles,
    rule: StripRule | BatchRule,
    q_len: int,
    k_len: int,
    device: torch.device,
    cut: Cut | None = None,
) -> tuple[BlockMask, dict[str, bool]]:
    """The ``BlockMask`` of one strip call and the kernel flags it makes safe; with a :class:`Cut` (key padding or
    packed documents) there is one mask per call and no flag is safe (a query may have only padded keys, and
    padding or a document's end splits runs of full tiles)."""
    from torch.nn.attention.flex_attention import BlockMask

    lists: tuple[torch.Tensor, ...] = (
        (*block_lists(tiles.partial, device), *block_lists(tiles.full, device)) if cut is None else cut.lists
    )
    mask_mod = _rule_of(*call_mask_parts(tiles, rule, device, cut))
    kv_num, kv_index, full_num, full_index = lists[:4]
    block_mask = BlockMask.from_kv_blocks(
        kv_num, kv_index, full_num, full_index, BLOCK_SIZE=tiles.tile, mask_mod=mask_mod, seq_lengths=(q_len, k_len),
        compute_q_blocks=cut is None,
    )  # fmt: skip
    if cut is not None:
        block_mask.q_num_blocks, block_mask.q_indices, block_mask.full_q_num_blocks, block_mask.full_q_indices = (
            cut.lists[4:]
        )
        return block_mask, {}
    # a query sees itself in its diagonal tile (every window holds offset 0) unless the layout or segment cut it
    diagonal_only = rule.same_strip and rule.causal and not (tiles.needs_layout or tiles.needs_segment)
    return block_mask, safe_flags(tiles.full, tiles.partial, diagonal_only)


def compiled_flex(name: str, function: Callable[..., Any], tile: int) -> Any:
    """``function`` (a FlexAttention call) compiled for CUDA, once per ``name`` and kind of tile (``tile``: the
    block mask's rows), whole: where dynamo cannot trace it or a compile fails, it raises instead of running the call
    unfused (:func:`unfused_reasons`); so does this function where dynamo would not compile (every call asks for its
    compiled function here, just before it runs; :func:`flex_reasons` keeps such calls off the strips: only a switch
    between the two gets here). Each strip shape and rule variant is one more
    graph of the same function: a call past dynamo's recompile limits (where it raises) runs again with them lifted, as
    torch lifts them for the compiles inside its own ``flex_attention``."""
    _require_compiled()
    # Block tiles compile with max_autotune: inductor's backward drops the configs whose default tiles do not
    # divide the block mask's before it applies kernel_options (pytorch/pytorch#176025), and only
    # max_autotune's list holds small ones (each then runs the options' tiles).
    fine = tile < FLEX_TILE
    key = f"{name} block tiles" if fine else name
    if key not in _COMPILED:
        options: dict[str, Any] | None = {"max_autotune": True} if fine else None
        _COMPILED[key] = functools.partial(
            _past_recompile_limits, torch.compile(function, fullgraph=True, dynamic=False, options=options)
        )
    return _COMPILED[key]


def _require_compiled() -> None:
    reasons = unfused_reasons()
    if reasons:
        raise RuntimeError(f"FlexAttention's strips need its compiled kernels on CUDA: {'; '.join(reasons)}")


def _past_recompile_limits(compiled: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from torch._dynamo.exc import FailOnRecompileLimitHit

    try:
        return compiled(*args, **kwargs)
    except FailOnRecompileLimitHit:  # (raised before the call ran; lifting the limits for every call costs host time)
        config = torch._dynamo.config
        limits = config.recompile_limit, config.accumulated_recompile_limit
        config.recompile_limit = config.accumulated_recompile_limit = sys.maxsize
        try:
            return compiled(*args, **kwargs)
        finally:
            config.recompile_limit, config.accumulated_recompile_limit = limits


def flex_strip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    *,
    scale: float,
    enable_gqa: bool,
    kernel_options: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, h, n, D)`` FlexAttention (compiled once per shape on CUDA); returns ``out`` and its natural-log
    ``lse`` ``(B, h, n)`` (float32; ``-inf`` and a zero output for rows with no allowed key)."""
    flex = _flex_attention()
    if q.device.type == "cuda":
        flex = compiled_flex("forward", flex, block_mask.BLOCK_SIZE[0])
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        result: tuple[torch.Tensor, torch.Tensor] = flex(
            q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options,
            return_lse=True,
        )  # fmt: skip
        return result
    out, aux = flex(
        q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options,
        return_aux=AuxRequest(lse=True),
    )  # fmt: skip
    return out, aux.lse


def math_strip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: Tiles,
    rule: StripRule | BatchRule,
    *,
    scale: float,
    enable_gqa: bool,
    cut: Cut | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same call as dense masked attention in torch ops (any device and dtype, differentiable): the
    reference twin of :func:`flex_strip_attention` that tests run forward and backward on the CPU. It
    keeps the pairs of full tiles and the pairs of partial tiles that the rule (without the layout term
    where the tiles say it cannot matter) allows: exactly what the fused kernel computes on CUDA, with
    the call's :class:`Cut` (key padding, packed documents) the same way."""
    if enable_gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    t = tiles.tile
    grids = (tiles.full, tiles.partial) if cut is None else (cut.full, cut.partial)
    pad, segments = (None, None) if cut is None else (cut.pad, cut.segments)
    full, partial = (x.repeat_interleave(t, -2).repeat_interleave(t, -1).to(q.device) for x in grids)
    allowed = full | (partial & rule.dense(q.shape[1], tiles.needs_layout, pad, segments))
    work = torch.promote_types(q.dtype, torch.float32)  # as the kernel: scores, softmax and lse in float32 at least
    scores = torch.einsum("bhnd,bhmd->bhnm", q.to(work), k.to(work)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    return torch.einsum("bhnm,bhmd->bhnd", weights, v.to(work)).to(q.dtype), lse


def strip_call_forward(
    call: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    grad: bool,
    math: bool = False,
    cut: Cut | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """One strip call on FlexAttention (``math``: its dense twin): ``(o (B, h, n, D), lse (B, h, n), leaves)``;
    with ``grad`` the graph from the leaves (the views the gradients land in) to ``o`` and ``lse`` is kept.
    ``cut``: the call's :class:`Cut` (:func:`call_cuts`) when it was built padded or for packed documents."""
    leaves = tuple(x.detach().requires_grad_(grad) for x in (call.q_view(q), call.kv_leaf(k), call.kv_leaf(v)))
    with torch.set_grad_enabled(grad):
        qt, kt, vt = (x.transpose(1, 2) for x in (leaves[0], call.kv_input(leaves[1]), call.kv_input(leaves[2])))
        if math:
            o, lse = math_strip_attention(qt, kt, vt, call.tiles, call.rule, scale=scale, enable_gqa=call.gqa, cut=cut)
        else:
            block_mask = call.block_mask
            if cut is not None:
                block_mask, _ = strip_block_mask(call.tiles, call.rule, len(call.q), len(call.k), q.device, cut)
            o, lse = flex_strip_attention(
                qt, kt, vt, block_mask, scale=scale, enable_gqa=call.gqa, kernel_options=call.kernel_options
            )
    return o, lse, leaves


def sparse_backward(
    call: Any,
    o: torch.Tensor,
    lse_call: torch.Tensor,
    leaves: tuple[torch.Tensor, ...],
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact ``(dq, dk, dv)`` of one FlexAttention call under the final ``out``/``lse`` (its graph kept from
    ``o, lse_call`` to ``leaves``; the rule is in :mod:`ring_blocksparse.strided`'s docstring). ``dlse``: the
    final lse's gradient ``(B, N, H)``; it reaches the call's lse times ``exp(lse_call - lse)``."""
    final_lse = call.q_view(lse).transpose(1, 2)
    grad_out, grad_lse = grad_inputs(
        call.q_view(dout).transpose(1, 2),
        o,
        call.q_view(out).transpose(1, 2),
        lse_call,
        final_lse,
    )
    if dlse is not None:
        share = torch.where(torch.isneginf(final_lse), 0.0, torch.exp(lse_call - final_lse))
        grad_lse = grad_lse + share * call.q_view(dlse).transpose(1, 2)
    dq, dk, dv = torch.autograd.grad((o, lse_call), leaves, (grad_out, grad_lse))
    return dq, dk, dv


def grad_inputs(
    dout: torch.Tensor, o: torch.Tensor, out: torch.Tensor, lse_call: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w * dout, w * rowsum(dout * (o - out)))`` with ``w = exp(lse_call - lse)`` (0 where ``lse`` is
    ``-inf``): ``(B, h, n, D)`` views and ``(B, h, n)`` log-sum-exps; one Triton pass on CUDA."""
    grad_out = torch.empty(o.shape, dtype=o.dtype, device=o.device)
    grad_lse = torch.empty(lse_call.shape, dtype=lse_call.dtype, device=o.device)
    if _triton_ready(dout, o, out) and lse_call.dtype == lse.dtype == torch.float32:
        from ._triton_grads import grad_inputs_kernel

        b, h, n, width = o.shape
        block_d = max(16, 1 << (width - 1).bit_length())
        block_r = max(1, 4096 // block_d)
        strides = [x.stride()[:3] for x in (dout, o, out, lse_call, lse, grad_out, grad_lse)]
        with torch.cuda.device(o.device):
            grad_inputs_kernel[(_cdiv(b * h * n, block_r),)](
                dout, o, out, lse_call, lse, grad_out, grad_lse, b * h * n, h, n, width,
                *(s for group in strides for s in group), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
            )  # fmt: skip
        return grad_out, grad_lse
    acc = lse_call.dtype
    finite = torch.isfinite(lse)
    weight = torch.exp(lse_call - lse.masked_fill(~finite, 0)).masked_fill(~finite, 0)
    grad_out.copy_(dout.to(acc) * weight[..., None])
    grad_lse.copy_(weight * (dout.to(acc) * (o.to(acc) - out.to(acc))).sum(-1))
    return grad_out, grad_lse


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _triton_ready(*tensors: torch.Tensor) -> bool:
    if not all(
        x.is_cuda and x.stride(-1) == 1 and x.dtype in (torch.float16, torch.bfloat16, torch.float32) for x in tensors
    ):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
