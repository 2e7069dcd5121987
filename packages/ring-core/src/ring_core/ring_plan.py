"""The ring plan: which blocks one rank computes and who sends what to whom.

A shard is one or two contiguous *pieces* of global positions (see
:mod:`ring_core.sharding`). For a dilated branch ``(w, r)`` and offset ``o`` the
selected positions of a piece fall into *runs*, one per segment they touch. Runs
inside one piece are computed locally; two pieces share at most one segment, and
when a piece of rank ``s`` shares a segment with a piece of rank ``t``, ``s`` sends
``t`` only the selected rows of that run, and only the key/value heads of the
offset's query heads. Causally, a piece that lies entirely after the query piece is
skipped (nothing sent). The plan is data; :mod:`ring_core.ring_schedule` runs it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .dilated import Branch, Part, offset_heads
from .sharding import shard_ranges

__all__ = [
    "Item",
    "RingPlan",
    "Step",
    "Transfer",
    "build_ring_plan",
    "segments_within_shards",
]


@dataclass(frozen=True)
class _Run:
    """Selected positions ``[i0, i1)`` (units of the rate) of one piece, in segments of ``length``."""

    segment: int  # global index of the first segment
    i0: int
    i1: int
    length: int


@dataclass(frozen=True)
class Item:
    """One cross-piece block: the receiver's ``q_part`` rows see key slot ``slot`` of a :class:`Transfer`."""

    q_part: Part
    slot: int


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
    """Every block of one rank: runs inside its pieces, blocks between its own pieces, one step per peer."""

    local_parts: tuple[Part, ...]
    local: Transfer
    steps: tuple[Step, ...]


def _part_rows(part: Part) -> int:
    return part.stop - part.start


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


def _run_for_segment(runs: list[_Run], segment: int) -> tuple[int, int] | None:
    for run in runs:
        nseg = (run.i1 - run.i0) // run.length
        if run.segment <= segment < run.segment + nseg:
            i0 = run.i0 + (segment - run.segment) * run.length
            return i0, min(run.i1, i0 + run.length)
    return None


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
) -> RingPlan:
    """The blocks of ``rank`` for a global sequence of ``seq_len`` (cached).

    ``heads=(start, stop)`` plans only the query heads ``[start, stop)`` of the ``num_heads``
    (a strategy that splits heads over ranks, e.g. Ulysses), numbered from ``start`` in the
    plan's parts; each head keeps its global dilation offset ``h mod r`` and its
    ``head_groups`` branch. ``start`` and ``stop`` must be multiples of ``num_heads //
    num_kv_heads`` so the chunk's query heads read a chunk of the key/value heads.
    """
    groups = num_heads // num_kv_heads
    start, stop = (0, num_heads) if heads is None else heads
    if not (0 <= start < stop <= num_heads and start % groups == 0 and stop % groups == 0):
        raise ValueError(
            f"heads must be a range [start, stop) inside [0, {num_heads}) whose ends are multiples of "
            f"num_heads // num_kv_heads = {groups}, got {heads}"
        )
    pieces = [shard_ranges(seq_len, p, world_size, layout) for p in range(world_size)]

    def local_start(p: int, index: int) -> int:
        return sum(b - a for a, b in pieces[p][:index])

    # runs[p][piece][(branch, offset)] = (first local position, runs)
    runs: list[list[dict[tuple[int, int], tuple[int, list[_Run]]]]] = []
    heads_of: dict[tuple[int, int], tuple[slice, Any]] = {}
    for bi, branch in enumerate(branch_list):
        # the branch's heads inside the range, renumbered from `start`: offsets keep their global meaning
        local = Branch(
            branch.segment, branch.rate, max(branch.head_start, start) - start, min(branch.head_stop, stop) - start
        )
        if local.head_start >= local.head_stop:
            continue
        for offset in range(branch.rate):
            selected = offset_heads(local, (offset - start) % branch.rate, groups, device)
            if selected is not None:
                heads_of[bi, offset] = selected
    for p in range(world_size):
        per_piece = []
        for index, (a, b) in enumerate(pieces[p]):
            table = {}
            for bi, offset in heads_of:
                first, piece_runs = _runs(a, b, branch_list[bi], offset)
                table[bi, offset] = (local_start(p, index) + first - a, piece_runs)
            per_piece.append(table)
        runs.append(per_piece)

    def part(p: int, index: int, key: tuple[int, int], i0: int, i1: int, length: int) -> Part:
        heads, kv_heads = heads_of[key]
        base, _ = runs[p][index][key]
        return Part(base, branch_list[key[0]].rate, i0, i1, length, heads, kv_heads)

    def transfer(src: int, dst: int) -> Transfer:
        slots: dict[tuple, tuple[int, Part]] = {}  # each distinct key run travels once
        found = []
        for key in heads_of:
            for qi, (_, qb) in enumerate(pieces[dst]):
                for ki, (ka, _) in enumerate(pieces[src]):
                    if (src, ki) == (dst, qi) or (causal and ka >= qb):
                        continue
                    q_runs, k_runs = runs[dst][qi][key][1], runs[src][ki][key][1]
                    if not q_runs or not k_runs:
                        continue
                    low = max(q_runs[0].segment, k_runs[0].segment)
                    high = min(_last_segment(q_runs), _last_segment(k_runs))
                    for segment in range(low, high + 1):
                        q_span, k_span = _run_for_segment(q_runs, segment), _run_for_segment(k_runs, segment)
                        if q_span and k_span:
                            slot_key = (key, ki, k_span)
                            if slot_key not in slots:
                                slots[slot_key] = (len(slots), part(src, ki, key, *k_span, k_span[1] - k_span[0]))
                            q_part = part(dst, qi, key, *q_span, q_span[1] - q_span[0])
                            found.append(Item(q_part, slots[slot_key][0]))
        return Transfer(tuple(p for _, p in slots.values()), tuple(found))

    local_parts = []
    for index in range(len(pieces[rank])):
        for key in heads_of:
            piece_runs = runs[rank][index][key][1]
            for run in piece_runs:
                local_parts.append(part(rank, index, key, run.i0, run.i1, run.length))
    steps = tuple(
        Step(
            (rank - j) % world_size,
            transfer((rank - j) % world_size, rank),
            (rank + j) % world_size,
            transfer(rank, (rank + j) % world_size),
        )
        for j in range(1, world_size)
    )
    return RingPlan(tuple(local_parts), transfer(rank, rank), steps)


def _last_segment(runs: list[_Run]) -> int:
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
