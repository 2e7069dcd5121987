"""The ring plan: which blocks one rank computes and who sends what to whom.

A shard is one or two contiguous *pieces* of global positions (see
:mod:`ring_core.sharding`). For a dilated branch ``(w, r)`` and offset ``o`` the
selected positions of a piece fall into *runs*, one per segment they touch. Runs
inside one piece are computed locally; two pieces share at most one segment, and
when a piece of rank ``s`` shares a segment with a piece of rank ``t``, ``s`` sends
``t`` only the selected rows of that run, and only the key/value heads of the
offset's query heads. Causally, a piece that lies entirely after the query piece is
skipped (nothing sent). The plan is data; :mod:`ring_core.ring_schedule` runs it.

Packed documents (``cu_seqlens``, global) cut every piece into *spans*, one per
document it meets; segments and offsets count from the document's start, and only
spans of the same document meet. A sliding window narrows a cross-piece block to the
queries and keys that can meet (:func:`ring_core.windows.reach`), so a window of ``w``
positions across a shard boundary sends about ``w`` rows; a rank's keys that no query
of a peer can see are not sent at all.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .dilated import Block, Branch, Part, branch_offsets, offset_heads, part_blocks
from .sharding import shard_ranges
from .windows import NO_WINDOW, covers, index_window, kernel_window, reach

__all__ = [
    "Item",
    "RingPlan",
    "Step",
    "Transfer",
    "build_ring_plan",
    "item_kv_part",
    "segments_within_shards",
]


@dataclass(frozen=True)
class _Run:
    """Selected positions ``[i0, i1)`` (units of the rate) of one piece, in segments of ``length``."""

    segment: int  # index of the first segment (in its document)
    i0: int
    i1: int
    length: int


@dataclass(frozen=True)
class _Span:
    """The selected positions of one branch offset where a piece and a document overlap."""

    document: int
    base: int  # local position (in its rank's shard) of the first one
    index: int  # its index among the document's selected positions
    runs: tuple[_Run, ...]


# a block's key group: ((branch, offset), key piece, key span, segment)
_Group = tuple[tuple[int, int], int, _Span, int]


@dataclass(frozen=True)
class Item:
    """One cross-piece block: the receiver's ``q_part`` rows see key slot ``slot`` of a :class:`Transfer`.

    ``keys``: the slot's rows it sees (``None``: all); ``window``: the kernel window
    (:mod:`ring_core.windows`) or None.
    """

    q_part: Part
    slot: int
    keys: tuple[int, int] | None = None
    window: tuple[int, int] | None = None


@dataclass(frozen=True)
class Transfer:
    """What one rank sends another: each key run once (sender's coordinates), and the blocks that use them."""

    kv_parts: tuple[Part, ...] = ()
    items: tuple[Item, ...] = ()


@dataclass(frozen=True)
class Step:
    """Step ``j`` of the ring: receive ``recv`` from ``recv_from`` and send ``send`` to ``send_to``."""

    recv_from: int
    recv: Transfer
    send_to: int
    send: Transfer


@dataclass(frozen=True)
class RingPlan:
    """Every block of one rank: blocks inside its pieces, blocks between its own pieces, one step per peer."""

    local_blocks: tuple[Block, ...]
    local: Transfer
    steps: tuple[Step, ...]


def item_kv_part(transfer: Transfer, item: Item) -> Part:
    """The key rows ``item`` sees, as a part of the sender's shard (a slot's part is one segment)."""
    part = transfer.kv_parts[item.slot]
    if item.keys is None:
        return part
    lo, hi = item.keys
    return replace(part, start=part.start + lo, stop=part.start + hi, length=hi - lo)


def _part_rows(part: Part) -> int:
    return (part.stop - part.start) // part.length * part.segment_rows


def _part_kv_heads(part: Part, num_kv_heads: int) -> int:
    heads = part.kv_heads
    return len(range(*heads.indices(num_kv_heads))) if isinstance(heads, slice) else int(heads.numel())


def _runs(start: int, stop: int, branch: Branch, offset: int) -> tuple[int, list[_Run]]:
    """The first selected position of global piece ``[start, stop)`` and its runs (head, full, tail)."""
    w, r = branch.segment, branch.rate
    first = start + (offset - start) % r
    if first >= stop:
        return first, []
    count = (stop - 1 - first) // r + 1
    m = w // r
    seg0 = first // w
    head = min(count, -(-((seg0 + 1) * w - first) // r))
    full, tail = divmod(count - head, m)
    if head == m:  # the piece starts on a segment boundary: one batch of full segments
        runs = [_Run(seg0, 0, head + full * m, m)]
    else:
        runs = [_Run(seg0, 0, head, head)]
        if full:
            runs.append(_Run(seg0 + 1, head, head + full * m, m))
    if tail:
        runs.append(_Run(seg0 + 1 + full, head + full * m, count, tail))
    return first, runs


def _run_for_segment(runs: Sequence[_Run], segment: int) -> tuple[int, int] | None:
    for run in runs:
        nseg = (run.i1 - run.i0) // run.length
        if run.segment <= segment < run.segment + nseg:
            i0 = run.i0 + (segment - run.segment) * run.length
            return i0, min(run.i1, i0 + run.length)
    return None


def _spans(
    start: int, stop: int, local_start: int, branch: Branch, offset: int, documents: Sequence[tuple[int, int]]
) -> list[_Span]:
    """The spans of global piece ``[start, stop)`` (whose first position is ``local_start`` in its shard)."""
    spans = []
    for document, (doc_start, doc_stop) in enumerate(documents):
        lo, hi = max(start, doc_start), min(stop, doc_stop)
        if lo >= hi:
            continue
        first, runs = _runs(lo - doc_start, hi - doc_start, branch, offset)  # document coordinates
        if runs:
            base = local_start + doc_start + first - start
            spans.append(_Span(document, base, (first - offset) // branch.rate, tuple(runs)))
    return spans


def _merge_slots(needs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The key ranges to send: overlapping or touching ranges of ``needs`` joined."""
    merged: list[list[int]] = []
    for lo, hi in sorted(needs):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


@functools.lru_cache(maxsize=64)
def build_ring_plan(
    seq_len: int,
    world_size: int,
    rank: int,
    layout: str,
    branch_list: tuple[Branch, ...],
    num_heads: int,
    num_kv_heads: int,
    causal: bool,
    device: torch.device,
    heads: tuple[int, int] | None = None,
    *,
    window: tuple[int, int] = NO_WINDOW,
    documents: tuple[int, ...] | None = None,
    native_window: bool = False,
) -> RingPlan:
    """The blocks of ``rank`` for a global sequence of ``seq_len`` (cached).

    ``heads=(start, stop)`` plans only the query heads ``[start, stop)`` of the ``num_heads``
    (a strategy that splits heads over ranks, e.g. Ulysses), numbered from ``start`` in the
    plan's parts; each head keeps its global dilation offset ``h mod r`` and its
    ``head_groups`` branch. ``start`` and ``stop`` must be multiples of ``num_heads //
    num_kv_heads`` so the chunk's query heads read a chunk of the key/value heads.

    ``window`` (SPEC.md's ``window_size``) and ``documents`` (``cu_seqlens`` values) shape
    the blocks: a cross-piece block keeps only the queries and keys its window lets meet,
    so only those keys travel. ``native_window``: the kernel takes windows itself (no
    tiles of local segments).
    """
    groups = num_heads // num_kv_heads
    start, stop = (0, num_heads) if heads is None else heads
    if not (0 <= start < stop <= num_heads and start % groups == 0 and stop % groups == 0):
        raise ValueError(
            f"heads must be a range [start, stop) inside [0, {num_heads}) whose ends are multiples of "
            f"num_heads // num_kv_heads = {groups}, got {heads}"
        )
    pieces = [shard_ranges(seq_len, p, world_size, layout) for p in range(world_size)]
    if documents is not None and documents[-1] != seq_len:
        raise ValueError(f"cu_seqlens must end at N={seq_len} (the packed length), got {documents[-1]}")
    doc_ranges = list(itertools.pairwise(documents)) if documents is not None else [(0, seq_len)]

    def local_start(p: int, index: int) -> int:
        return sum(b - a for a, b in pieces[p][:index])

    heads_of: dict[tuple[int, int], tuple[slice, Any]] = {}
    for bi, branch in enumerate(branch_list):
        # the branch's heads inside the range, renumbered from `start`: offsets keep their global meaning
        local = Branch(
            branch.segment, branch.rate, max(branch.head_start, start) - start, min(branch.head_stop, stop) - start
        )
        if local.head_start >= local.head_stop:
            continue
        in_range = Branch(branch.segment, branch.rate, local.head_start + start, local.head_stop + start)
        for offset in branch_offsets(in_range):  # at most one per head, however large the rate
            selected = offset_heads(local, (offset - start) % branch.rate, groups, device)
            if selected is not None:
                heads_of[bi, offset] = selected
    # spans[p][piece][(branch, offset)]: where the piece meets each document
    spans = [
        [
            {key: _spans(a, b, local_start(p, index), branch_list[key[0]], key[1], doc_ranges) for key in heads_of}
            for index, (a, b) in enumerate(pieces[p])
        ]
        for p in range(world_size)
    ]
    windows = {key: index_window(window, branch_list[key[0]].rate, causal) for key in heads_of}

    def part(key: tuple[int, int], span: _Span, i0: int, i1: int, length: int) -> Part:
        heads, kv_heads = heads_of[key]
        return Part(span.base, branch_list[key[0]].rate, i0, i1, length, heads, kv_heads)

    def blocks_between(src: int, dst: int) -> Iterator[tuple[_Group, tuple[int, int], Part, tuple[int, int] | None]]:
        """``(slot group, key indices, q_part, window)`` of every block of ``dst``'s queries on ``src``'s keys."""
        for key in heads_of:
            win = windows[key]
            for qi, (_, qb) in enumerate(pieces[dst]):
                for ki, (ka, _) in enumerate(pieces[src]):
                    if (src, ki) == (dst, qi) or (causal and ka >= qb):
                        continue
                    k_spans = {span.document: span for span in spans[src][ki][key]}
                    for q_span in spans[dst][qi][key]:
                        k_span = k_spans.get(q_span.document)
                        if k_span is None:
                            continue
                        low = max(q_span.runs[0].segment, k_span.runs[0].segment)
                        high = min(_last_segment(q_span.runs), _last_segment(k_span.runs))
                        for segment in range(low, high + 1):
                            q_rows, k_rows = (
                                _run_for_segment(q_span.runs, segment),
                                _run_for_segment(k_span.runs, segment),
                            )
                            if not (q_rows and k_rows):
                                continue
                            # document indices; then only the queries and keys the window lets meet
                            q_idx = (q_span.index + q_rows[0], q_span.index + q_rows[1])
                            k_idx = reach(q_idx, win, (k_span.index + k_rows[0], k_span.index + k_rows[1]))
                            q_idx = reach(k_idx, win[::-1], q_idx)
                            if k_idx[0] >= k_idx[1] or q_idx[0] >= q_idx[1]:
                                continue
                            q_i0, q_i1 = q_idx[0] - q_span.index, q_idx[1] - q_span.index
                            q_part = part(key, q_span, q_i0, q_i1, q_i1 - q_i0)
                            block_window = None if covers(q_idx, k_idx, win) else kernel_window(q_idx, k_idx, win)
                            yield (key, ki, k_span, segment), k_idx, q_part, block_window

    def transfer(src: int, dst: int) -> Transfer:
        found = list(blocks_between(src, dst))
        needs: dict[_Group, list[tuple[int, int]]] = {}
        for group, k_idx, _, _ in found:
            needs.setdefault(group, []).append(k_idx)
        slots: dict[_Group, list[tuple[int, tuple[int, int]]]] = {}  # group -> (slot, key indices)
        kv_parts: list[Part] = []
        for group, ranges in needs.items():  # each key row travels once
            key, _, k_span, _ = group
            for lo, hi in _merge_slots(ranges):
                slots.setdefault(group, []).append((len(kv_parts), (lo, hi)))
                kv_parts.append(part(key, k_span, lo - k_span.index, hi - k_span.index, hi - lo))
        items = []
        for group, (lo, hi), q_part, block_window in found:
            slot, (s_lo, s_hi) = next(entry for entry in slots[group] if entry[1][0] <= lo and hi <= entry[1][1])
            keys = None if (lo, hi) == (s_lo, s_hi) else (lo - s_lo, hi - s_lo)
            items.append(Item(q_part, slot, keys, block_window))
        return Transfer(tuple(kv_parts), tuple(items))

    local_blocks = []
    for index in range(len(pieces[rank])):
        for key in heads_of:
            for span in spans[rank][index][key]:
                for run in span.runs:
                    local_part = part(key, span, run.i0, run.i1, run.length)
                    local_blocks += part_blocks(local_part, windows[key], native_window=native_window)
    steps = tuple(
        Step(
            (rank - j) % world_size,
            transfer((rank - j) % world_size, rank),
            (rank + j) % world_size,
            transfer(rank, (rank + j) % world_size),
        )
        for j in range(1, world_size)
    )
    return RingPlan(tuple(local_blocks), transfer(rank, rank), steps)


def _last_segment(runs: Sequence[_Run]) -> int:
    last = runs[-1]
    return last.segment + (last.i1 - last.i0) // last.length - 1


def segments_within_shards(local_len: int, world_size: int, layout: str, segment_lengths: Sequence[int]) -> bool:
    """Whether every segment of every branch lies inside one rank's shard (so the ring has nothing to send).

    A shard is one run of ``local_len`` positions (``contiguous``) or two runs of
    ``local_len / 2`` (``zigzag``); when every segment length divides the run length, each
    rank's segments are exactly the segments of its own shard taken as a sequence, and
    the single-device schedule on the shard computes the ring's blocks. With one rank the
    shard is the whole sequence: always true.
    """
    if world_size == 1:
        return True
    run = local_len // 2 if layout == "zigzag" else local_len
    return run > 0 and all(w <= run and run % w == 0 for w in segment_lengths)
