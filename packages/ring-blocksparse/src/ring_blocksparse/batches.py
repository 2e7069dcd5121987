"""Strip calls of one shape as one kernel call: their strided views stacked on the batch dimension.

Each strip call costs host work besides its kernel (FlexAttention's compiled-call wrappers and block
mask, the merge and gradient launches), and a dilated configuration has a call per branch offset (with
packed documents, per offset and strip: 21 for rates 1, 2, 4), so the strips were bound by the host.
For a batch of one (``B == 1``), the calls of a branch whose views have the same shape and whose
rows and heads step by the same amounts from call to call (offsets ``o, o+1, ...`` of one strip rate,
heads ``o, o+1, ...`` each with its own strided set) are one strided view of every tensor with the
calls on its batch dimension: the view of call ``i`` starts ``i * step`` elements after the first's.
:class:`StripBatch` is such a group: one FlexAttention call whose block mask and rule are the calls'
own, stacked (batch ``i`` reads call ``i``'s tiles, positions, segments, layout and padding), so its
results are each call's exactly; so is one flash-attn 4 call (its block lists per batch, its ``mask_mod``
reading the batch index). Key/value views must not overlap across the calls (their gradients land
there); calls that share key/value rows and heads stay apart, and so do calls on different kernels.
``RING_BLOCKSPARSE_BATCH=0`` runs every call alone (for A/B timing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .flex import BatchRule, strip_block_mask
from .strips import Strip, Tiles

BATCH_ENV = "RING_BLOCKSPARSE_BATCH"  # "0": every strip call alone


def _start(index: slice | torch.Tensor) -> int:
    assert isinstance(index, slice)  # (only calls with a slice of key/value heads are batched)
    return int(index.start or 0)


def _geometry(call: Any) -> tuple[int, int, int, int]:
    """What steps from call to call in a batch: the first query row and head, the first key row and key/value head."""
    return call.q.offset, _start(call.heads), call.k.offset, _start(call.kv)


def _shape(call: Any) -> tuple[Any, ...]:
    """What the calls of a batch share."""
    heads, kv = call.heads, call.kv
    tiles, rule = call.tiles, call.rule
    layout = None if rule.layout is None else tuple(rule.layout.shape)
    return (
        call.q.rate, len(call.q), len(call.k), heads.step, len(range(heads.start, heads.stop, heads.step)), kv.step,
        len(range(kv.start, kv.stop, kv.step or 1)), call.gqa, call.causal, call.segment, tiles.tile,
        tuple(tiles.full.shape), tiles.padded, layout,
    )  # fmt: skip


def _kv_cells(call: Any) -> set[tuple[int, int]]:
    """(key row, key/value head) pairs of the call's key/value view, as residues: rows of the strip are
    ``offset + rate * j``, so two calls of one rate share rows exactly when their offsets agree."""
    kv = call.kv
    return {(call.k.offset, h) for h in range(kv.start, kv.stop, kv.step or 1)}


def batchable(call: Any) -> bool:
    """Whether a call may join a batch: a sparse (not dense) call that does not write the results first, with a slice
    of key/value heads."""
    return call.run is None and not call.covering and isinstance(call.kv, slice) and isinstance(call.heads, slice)


def batch_groups(calls: Sequence[Any], kernels: Sequence[str | None] | None = None) -> list[list[int]]:
    """The calls (indices, in order) grouped into batches: consecutive batchable calls of one shape and one kernel
    (``kernels``: what computes each call, None for a call that runs alone) whose geometry steps evenly and whose
    key/value views do not overlap; every other call alone."""
    kernels = kernels or ["any"] * len(calls)
    # each call's shape (with its kernel) and geometry once (a run groups its calls on every forward and backward)
    shapes = [
        None if kernel is None or not batchable(call) else (kernel, _shape(call))
        for call, kernel in zip(calls, kernels)
    ]
    places = [None if shape is None else _geometry(call) for call, shape in zip(calls, shapes)]
    groups: list[list[int]] = []
    for index, shape in enumerate(shapes):
        group = groups[-1] if groups else None
        if (
            group is not None
            and shape is not None
            and shape == shapes[group[0]]
            and _joins(calls, places, group, index)
        ):
            group.append(index)
        else:
            groups.append([index])
    return groups


def _step(a: Any, b: Any) -> tuple[int, ...]:
    return tuple(y - x for x, y in zip(a, b))


def _joins(calls: Sequence[Any], places: Sequence[Any], group: list[int], index: int) -> bool:
    """Whether call ``index`` (of the group's shape) continues the group: the same step from the last call as the
    group's, none of its parts negative (a view's batch stride is the step in memory), another query view, and
    key/value views no call of the group has."""
    step = _step(places[group[-1]], places[index])
    if len(group) > 1 and step != _step(places[group[0]], places[group[1]]):
        return False
    if min(step) < 0:
        return False  # (packed documents: an offset's last strip, then the next offset's first)
    if step[:2] == (0, 0):
        return False  # (the same query view twice)
    cells = _kv_cells(calls[index])
    return all(not (cells & _kv_cells(calls[i])) for i in group)


def stacked(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Views ``(1, ...)`` of one tensor, of one shape and strides, each ``step`` elements after the one before, as one
    view with them on the first dimension."""
    first = views[0]
    if len(views) == 1:
        return first
    step = views[1].storage_offset() - first.storage_offset()
    for i, view in enumerate(views):
        if view.shape != first.shape or view.stride() != first.stride() or first.shape[0] != 1:
            raise AssertionError("batched strip views must be of one shape and batch 1")
        if view.storage_offset() != first.storage_offset() + i * step:
            raise AssertionError("batched strip views must step evenly")
    return first.as_strided((len(views), *first.shape[1:]), (step, *first.stride()[1:]), first.storage_offset())


def _stacked_tiles(tiles: Sequence[Tiles]) -> Tiles:
    first = tiles[0]
    return Tiles(
        torch.stack([t.full for t in tiles]), torch.stack([t.partial for t in tiles]),
        torch.stack([t.unit_any for t in tiles]), first.unit, first.tile,
        any(t.needs_layout for t in tiles), any(t.needs_segment for t in tiles),
        all(t.one_segment_units for t in tiles), any(t.needs_window for t in tiles), first.padded,
    )  # fmt: skip


@dataclass
class StripBatch:
    """Strip calls of one shape run as one kernel call (batch ``i``: call ``i``); it answers what a
    :class:`~ring_blocksparse.strided.StripCall` does where the FlexAttention and flash-attn 4 paths ask (its
    views stacked)."""

    calls: list[Any]
    tiles: Tiles = field(init=False)
    rule: BatchRule = field(init=False)
    block_mask: Any = None  # the calls' block masks stacked (None: theirs are built per call, from cuts)
    kernel_options: dict[str, Any] | None = None
    fa4: Any = False  # flash-attn 4's block lists of the batch (None: not built yet; False: FlexAttention)
    run: None = None
    covering: bool = False

    def __post_init__(self) -> None:
        first = self.calls[0]
        self.tiles = _stacked_tiles([c.tiles for c in self.calls])
        self.rule = BatchRule([c.rule for c in self.calls])
        options = [c.kernel_options or {} for c in self.calls]
        # a flag is safe for the batch where it is for every call (each call's mask kept its own)
        merged = {key: value for key, value in options[0].items() if all(o.get(key) == value for o in options)}
        self.kernel_options = merged or None
        self.q: Strip = first.q
        self.k: Strip = first.k
        self.heads, self.kv, self.gqa, self.causal = first.heads, first.kv, first.gqa, first.causal
        if all(c.block_mask is not None for c in self.calls):
            device = self.rule.qpos.device
            self.block_mask, _ = strip_block_mask(self.tiles, self.rule, len(self.q), len(self.k), device)

    def q_view(self, x: torch.Tensor) -> torch.Tensor:
        """``(m, n, h, ...)``: the calls' query-side views of a ``(1, N, H, ...)`` tensor, stacked."""
        return stacked([c.q_view(x) for c in self.calls])

    def kv_leaf(self, x: torch.Tensor) -> torch.Tensor:
        return stacked([c.kv_leaf(x) for c in self.calls])

    def kv_input(self, leaf: torch.Tensor) -> torch.Tensor:
        return leaf


def strip_batches(calls: Sequence[Any], q: torch.Tensor, kernels: Sequence[str | None]) -> list[Any]:
    """``calls`` as the units a run executes: at batch 1, batches of calls (:func:`batch_groups`; ``kernels``: what
    computes each call, ``"flex"``, a flash-attn 4 variant, or None for a dense call), each call alone otherwise
    (and with ``RING_BLOCKSPARSE_BATCH=0``).
    A batch is kept on its first call, so a cached plan builds it (and its block lists) once."""
    if q.shape[0] != 1 or os.environ.get(BATCH_ENV, "1") == "0":
        return list(calls)
    units: list[Any] = []
    for group in batch_groups(calls, kernels):
        members = [calls[i] for i in group]
        if len(group) == 1:
            units += members
            continue
        key = tuple(id(c) for c in members)
        if key not in members[0].batches:
            flex = kernels[group[0]] == "flex"
            members[0].batches[key] = StripBatch(members, fa4=False if flex else None)
        units.append(members[0].batches[key])
    return units
