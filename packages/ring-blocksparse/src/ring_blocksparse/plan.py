"""Planning block-sparse dilated attention: which (query tile, key tile) pairs exist and who needs what.

For each dilated branch ``(w, r)`` and offset ``o`` (the heads ``h = o mod r``), the
selected positions ``o + r*j`` are cut into **tiles**: runs of consecutive ``j`` inside
one segment, one shard chunk and one stretch of ``max(1, b // r)`` (so a tile spans at
most two layout blocks). A (query tile, key tile) pair of one segment is classified
from the block layout and causality:

- ``skip``: no allowed (query, key) pair for any head of the branch offset;
- ``full``: every pair allowed for every head (no mask needed);
- ``causal``: a tile with itself under ``is_causal``, layout full (kernel's causal flag);
- ``masked``: anything else (an explicit bool mask: layout and causality).

Pairs are batched into :class:`Group`\\ s: a query tile's key tiles from one source rank
are cut into chunks (32 tiles, then powers of two), and query tiles whose chunks have the
same shape become one kernel call, its batch padded to ``2^k`` or ``3 * 2^k``; so a layout of any
shape gives few distinct kernel shapes. Every
rank computes the same global plan, so each knows, without talking, which of its key
rows each other rank needs (``send``) and which rows it gets (``recv``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ring_core.plugin import Branch, branch_offsets, document_spans, shard_ranges

FULL, CAUSAL, MASKED = "full", "causal", "masked"

# Largest number of gathered key rows in one kernel call (bounds the gathered K/V and their gradients).
MAX_GATHERED_ROWS = 1 << 19
# Largest number of key tiles a query tile gives one kernel call (longer lists are split, LSE-merged).
MAX_CHUNK_TILES = 32


@dataclass
class Group:
    """One batched kernel call: ``G`` query tiles of ``Tq`` rows, each with ``K`` gathered key rows."""

    category: str
    source: int
    heads: slice
    kv_heads: slice | torch.Tensor
    q_pos: torch.Tensor  # (G, Tq) global positions
    k_pos: torch.Tensor  # (G, K) global positions
    # set by the plan once it knows every rank's rows (None until then)
    q_rows: torch.Tensor = field(default=None)  # type: ignore[assignment]  # (G*Tq,) rows of the local shard
    k_rows: torch.Tensor = field(default=None)  # type: ignore[assignment]  # (G*K,) rows of the source buffer
    mask: torch.Tensor | None = None  # (G, h', Tq, K) bool, masked groups only
    block_id: int = 0
    real: int = 0  # the first ``real`` of the G entries are real; the rest repeat entry 0 (padding)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.q_pos.shape[0], self.q_pos.shape[1], self.k_pos.shape[1]


@dataclass
class Plan:
    """Everything one rank does in one call, for one ``(N, H, H_kv, causal)``."""

    rank: int
    world_size: int
    local_positions: torch.Tensor
    groups: dict[int, list[Group]]  # source rank -> kernel calls (a batch of query tiles each)
    recv_positions: dict[int, torch.Tensor]  # source rank -> sorted global positions received
    send_rows: dict[int, torch.Tensor]  # destination rank -> local rows sent
    computed_pairs: int = 0  # (query, key) token pairs given to kernels, summed over heads, this rank
    # source rank -> the same pairs batched by key tile (each call: one key tile, its query rows),
    # for a backward whose dK/dV come out whole per call (None: not built)
    backward_groups: dict[int, list[Group]] | None = None

    def all_groups(self) -> Iterator[Group]:
        """Every group of both batchings."""
        for table in (self.groups, self.backward_groups or {}):
            for groups in table.values():
                yield from groups

    def to(self, device: torch.device) -> Plan:
        for g in self.all_groups():
            g.q_rows, g.k_rows = g.q_rows.to(device), g.k_rows.to(device)
            if isinstance(g.kv_heads, torch.Tensor):
                g.kv_heads = g.kv_heads.to(device)
            if g.mask is not None:
                g.mask = g.mask.to(device)
        self.send_rows = {d: rows.to(device) for d, rows in self.send_rows.items()}
        return self


@dataclass
class _Tiles:
    first: torch.Tensor  # first position of each tile
    length: torch.Tensor
    seg: torch.Tensor
    owner: torch.Tensor
    rate: int

    @property
    def last(self) -> torch.Tensor:
        return self.first + self.rate * (self.length - 1)

    def positions(self) -> torch.Tensor:
        """Every position of every tile, in tile order."""
        starts = torch.cumsum(self.length, 0) - self.length
        within = torch.arange(int(self.length.sum())) - torch.repeat_interleave(starts, self.length)
        return torch.repeat_interleave(self.first, self.length) + self.rate * within


def _ownership(seq_len: int, world_size: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted chunk starts and their owners (ranks)."""
    starts, owners = [], []
    for rank in range(world_size):
        for a, _ in shard_ranges(seq_len, rank, world_size, layout):
            starts.append(a)
            owners.append(rank)
    order = sorted(range(len(starts)), key=starts.__getitem__)
    return torch.tensor([starts[i] for i in order]), torch.tensor([owners[i] for i in order])


def _tiles(
    seq_len: int,
    segment: int,
    rate: int,
    offset: int,
    tile: int,
    chunk_starts: torch.Tensor,
    chunk_owner: torch.Tensor,
    documents: Sequence[int] | None = None,
) -> _Tiles:
    """Tiles of the selected positions; with ``documents`` (``cu_seqlens`` values) offsets, segments and tiles
    restart at every document (segment numbers stay distinct across documents)."""
    positions: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []
    segments: list[torch.Tensor] = []
    for start, stop in document_spans(documents, seq_len):
        j = torch.arange(len(range(offset, stop - start, rate)))
        if j.numel():
            seg = j // (segment // rate) + (int(segments[-1][-1]) + 1 if segments else 0)
            positions.append(start + offset + rate * j)
            indices.append(j)
            segments.append(seg)
    if not positions:
        empty = torch.zeros(0, dtype=torch.long)
        return _Tiles(empty, empty, empty, empty, rate)
    pos, j, seg = torch.cat(positions), torch.cat(indices), torch.cat(segments)
    count = pos.numel()
    chunk = torch.searchsorted(chunk_starts, pos, right=True) - 1
    change = torch.ones(count, dtype=torch.bool)
    change[1:] = (seg[1:] != seg[:-1]) | (chunk[1:] != chunk[:-1]) | (j[1:] // tile != j[:-1] // tile)
    starts = change.nonzero().flatten()
    length = torch.diff(starts, append=torch.tensor([count]))
    return _Tiles(pos[starts], length, seg[starts], chunk_owner[chunk[starts]], rate)


def _segment_pairs(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (query tile, key tile) of the same segment, ordered by query tile then key tile."""
    _, counts = torch.unique_consecutive(seg, return_counts=True)
    per_tile = torch.repeat_interleave(counts, counts)
    per_tile_start = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    q = torch.repeat_interleave(torch.arange(seg.numel()), per_tile)
    within = torch.arange(q.numel()) - torch.repeat_interleave(torch.cumsum(per_tile, 0) - per_tile, per_tile)
    return q, per_tile_start[q] + within


def _block_counts(tiles: _Tiles, block_size: int) -> tuple[torch.Tensor, ...]:
    """A tile spans at most two blocks: ``(block0, count0, block1, count1)``."""
    b0, b1 = tiles.first // block_size, tiles.last // block_size
    c0 = torch.minimum(tiles.length, -(-((b0 + 1) * block_size - tiles.first) // tiles.rate))
    return b0, c0, b1, tiles.length - c0


def _classify(
    tiles: _Tiles,
    q: torch.Tensor,
    k: torch.Tensor,
    heads_layout: torch.Tensor | None,
    block_size: int,
    causal: bool,
    window: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Per pair: category code (-1 skip, 0 full, 1 causal, 2 masked); ``window`` in positions."""
    total = tiles.length[q] * tiles.length[k]
    if heads_layout is None:
        counts = total[None]
    else:
        qb0, qc0, qb1, qc1 = (x[q] for x in _block_counts(tiles, block_size))
        kb0, kc0, kb1, kc1 = (x[k] for x in _block_counts(tiles, block_size))
        counts = torch.zeros(heads_layout.shape[0], q.numel(), dtype=torch.long)
        for qb, qc in ((qb0, qc0), (qb1, qc1)):
            for kb, kc in ((kb0, kc0), (kb1, kc1)):
                counts += heads_layout[:, qb, kb] * (qc * kc)
    layout_full = (counts == total).all(0)
    full, nonempty = layout_full.clone(), (counts > 0).any(0)
    left, right = window[0], 0 if causal else window[1]
    q_first, q_last, k_first, k_last = tiles.first[q], tiles.last[q], tiles.first[k], tiles.last[k]
    left_full = torch.ones_like(full)
    if left >= 0:  # tiles of one segment share a document: position differences are the document's
        nonempty &= k_last >= q_first - left
        left_full = q_last - left <= k_first
        full &= left_full
    if right >= 0:
        nonempty &= k_first <= q_last + right
        full &= k_last <= q_first + right
    code = torch.full_like(q, -1)
    code[nonempty] = 2
    code[nonempty & full] = 0
    if causal:  # a diagonal tile that only causality cuts: the kernel's causal flag
        code[(q == k) & nonempty & layout_full & left_full] = 1
    return code


def _head_sets(
    branch: Branch, offset: int, num_kv_heads: int, num_heads: int
) -> tuple[slice, slice | torch.Tensor] | None:
    """The query heads using ``offset`` of ``branch`` and their key/value heads (``None``: no head)."""
    first = branch.head_start + (offset - branch.head_start) % branch.rate
    if first >= branch.head_stop:
        return None
    heads = slice(first, branch.head_stop, branch.rate)
    groups = num_heads // num_kv_heads
    if groups == 1:
        return heads, heads
    if branch.rate == 1 and first % groups == 0 and branch.head_stop % groups == 0:
        return heads, slice(first // groups, branch.head_stop // groups)  # the kernel's own GQA
    return heads, torch.arange(first, branch.head_stop, branch.rate) // groups


def build_plan(
    *,
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    branch_list: Sequence[Branch],
    block_size: int,
    block_layout: torch.Tensor | None,
    causal: bool,
    rank: int = 0,
    world_size: int = 1,
    layout: str = "contiguous",
    max_gathered_rows: int | None = None,
    transposed_backward: bool = True,
    window: tuple[int, int] = (-1, -1),
    documents: Sequence[int] | None = None,
) -> Plan:
    """The plan of ``rank``: its kernel calls per source rank, and its send/receive rows.

    A kernel call gathers at most ``max_gathered_rows`` key rows (default
    :data:`MAX_GATHERED_ROWS`; larger batches are split). With ``transposed_backward`` the
    plan also batches the same pairs by key tile (``Plan.backward_groups``). ``window``
    (SPEC.md's ``window_size``) and ``documents`` (``cu_seqlens`` values) restrict the pairs
    further: a tile pair no window reaches is skipped, and so are its key rows in the ring.
    """
    max_gathered_rows = max_gathered_rows or MAX_GATHERED_ROWS
    chunk_starts, chunk_owner = _ownership(seq_len, world_size, layout)
    owner_of = chunk_owner[torch.searchsorted(chunk_starts, torch.arange(seq_len), right=True) - 1]
    local_positions = (owner_of == rank).nonzero().flatten()
    need = torch.zeros(world_size, seq_len, dtype=torch.bool)
    groups: dict[int, list[Group]] = {p: [] for p in range(world_size)}
    backward_groups: dict[int, list[Group]] = {p: [] for p in range(world_size)}
    computed = 0
    layout_cpu = None if block_layout is None else block_layout.cpu()
    for branch in branch_list:
        tile = max(1, block_size // branch.rate)
        for offset in branch_offsets(branch):
            if offset >= seq_len:
                continue
            head_sets = _head_sets(branch, offset, num_kv_heads, num_heads)
            if head_sets is None:
                continue
            heads, kv_heads = head_sets
            heads_layout = None
            if layout_cpu is not None:
                heads_layout = layout_cpu[heads] if layout_cpu.shape[0] > 1 else layout_cpu
            tiles = _tiles(seq_len, branch.segment, branch.rate, offset, tile, chunk_starts, chunk_owner, documents)
            if tiles.first.numel() == 0:
                continue
            q, k = _segment_pairs(tiles.seg)
            if causal:
                keep = tiles.first[k] <= tiles.last[q]
                q, k = q[keep], k[keep]
            code = _classify(tiles, q, k, heads_layout, block_size, causal, window)
            keep = code >= 0
            q, k, code = q[keep], k[keep], code[keep]
            mine = tiles.owner[q] == rank
            n_heads = len(range(heads.start, heads.stop, heads.step))
            computed += int((tiles.length[q[mine]] * tiles.length[k[mine]]).sum()) * n_heads
            # who needs which key rows: mark tiles, then their positions
            remote = tiles.owner[q] != tiles.owner[k]
            need_tile = torch.zeros(world_size, tiles.first.numel(), dtype=torch.bool)
            need_tile[tiles.owner[q[remote]], k[remote]] = True
            tile_of = torch.repeat_interleave(torch.arange(tiles.first.numel()), tiles.length)
            need[:, tiles.positions()] |= need_tile[:, tile_of]
            for code_value, category in enumerate((FULL, CAUSAL, MASKED)):
                for source in range(world_size):
                    select = mine & (code == code_value) & (tiles.owner[k] == source)
                    if select.any():
                        groups[source] += _make_groups(
                            tiles, q[select], k[select], category, source, heads, kv_heads, max_gathered_rows
                        )
                        if transposed_backward:
                            backward_groups[source] += _make_transposed_groups(
                                tiles, q[select], k[select], category, source, heads, kv_heads, max_gathered_rows
                            )
    plan = Plan(rank, world_size, local_positions, groups, {}, {}, computed)
    if transposed_backward:
        plan.backward_groups = backward_groups
    local_row = _row_lookup(local_positions, seq_len)
    for p in range(world_size):
        if p != rank:
            plan.recv_positions[p] = (need[rank] & (owner_of == p)).nonzero().flatten()
            plan.send_rows[p] = local_row[(need[p] & (owner_of == rank)).nonzero().flatten()]
    buffer_row = {
        p: local_row if p == rank else _row_lookup(plan.recv_positions[p], seq_len) for p in range(world_size)
    }
    for block_id, g in enumerate(plan.all_groups()):
        g.q_rows = local_row[g.q_pos.flatten()]
        g.k_rows = buffer_row[g.source][g.k_pos.flatten()]
        g.block_id = rank * 1_000_003 + block_id  # dropout streams differ between ranks
        if g.category == MASKED:
            g.mask = _mask(g, layout_cpu, block_size, causal, window)
    return plan


def _chunks(count: int, max_tiles: int) -> list[tuple[int, int]]:
    """``(first, size)`` of the key-tile chunks of a query tile with ``count`` key tiles.

    Whole chunks of ``max_tiles``, then the rest in descending powers of two: any
    layout yields few distinct kernel shapes (kernels such as cuDNN build one graph per
    shape), at the price of a few more LSE merges.
    """
    chunks, first = [], 0
    while count - first >= max_tiles:
        chunks.append((first, max_tiles))
        first += max_tiles
    rest = count - first
    bit = 1 << (rest.bit_length() - 1) if rest else 0
    while bit:
        if rest & bit:
            chunks.append((first, bit))
            first += bit
        bit >>= 1
    return chunks


def _power_of_two_at_most(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def _row_lookup(positions: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Global position -> row of a buffer holding ``positions`` (``-1`` where absent)."""
    rows = torch.full((seq_len,), -1, dtype=torch.long)
    rows[positions] = torch.arange(positions.numel())
    return rows


def _batch_bucket(real: int) -> int:
    """The padded batch size: the smallest ``2^k`` or ``3 * 2^k`` that holds ``real`` (waste < 1/3)."""
    power = 1 << (real - 1).bit_length()
    return 3 * power // 4 if power >= 4 and 3 * power // 4 >= real else power


def _make_groups(
    tiles: _Tiles,
    q: torch.Tensor,
    k: torch.Tensor,
    category: str,
    source: int,
    heads: slice,
    kv_heads: slice | torch.Tensor,
    max_rows: int,
) -> list[Group]:
    """Batch the pairs ``(q[i], k[i])`` (sorted by query tile) into kernel calls of few distinct shapes.

    A batch of ``G`` query tiles is padded (to ``2^k`` or ``3 * 2^k``) by repeating its first
    entry (``Group.real`` counts the real ones); padded entries are computed and dropped.
    """
    klen = tiles.length[k]
    uq, counts = torch.unique_consecutive(q, return_counts=True)
    pair_start = torch.cumsum(counts, 0) - counts
    flat_start = torch.cumsum(klen, 0) - klen
    flat_pos = torch.repeat_interleave(tiles.first[k], klen) + tiles.rate * (
        torch.arange(int(klen.sum())) - torch.repeat_interleave(flat_start, klen)
    )
    flat_end = flat_start + klen
    entries: dict[tuple[int, int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for count in torch.unique(counts).tolist():
        members = (counts == count).nonzero().flatten()
        qlen = tiles.length[uq[members]]
        for index, (first, size) in enumerate(_chunks(count, MAX_CHUNK_TILES)):
            first_pair = pair_start[members] + first
            start = flat_start[first_pair]
            length = flat_end[first_pair + size - 1] - start
            key = qlen * (int(length.max()) + 1) + length
            for value in torch.unique(key).tolist():
                chosen = key == value
                shape = (index, int(qlen[chosen][0]), int(length[chosen][0]))
                entries.setdefault(shape, []).append((members[chosen], start[chosen]))
    out = []
    for (_, tq, kk), parts in sorted(entries.items()):
        members = torch.cat([m for m, _ in parts])
        starts = torch.cat([s for _, s in parts])
        batch = _power_of_two_at_most(max_rows // kk)
        for chunk_members, chunk_starts in zip(members.split(batch), starts.split(batch)):
            real = chunk_members.numel()
            padded = _batch_bucket(real)
            if padded > real:
                chunk_members = torch.cat([chunk_members, chunk_members[:1].expand(padded - real)])
                chunk_starts = torch.cat([chunk_starts, chunk_starts[:1].expand(padded - real)])
            q_pos = tiles.first[uq[chunk_members]][:, None] + tiles.rate * torch.arange(tq)
            k_pos = flat_pos[chunk_starts[:, None] + torch.arange(kk)]
            out.append(Group(category, source, heads, kv_heads, q_pos, k_pos, real=real))
    return out


def _make_transposed_groups(tiles: _Tiles, q: torch.Tensor, k: torch.Tensor, *args: Any) -> list[Group]:
    """The pairs batched by key tile: each call has one key tile and its (gathered) query rows."""
    order = torch.argsort(k * tiles.first.numel() + q)
    out = _make_groups(tiles, k[order], q[order], *args)
    for g in out:
        g.q_pos, g.k_pos = g.k_pos, g.q_pos
    return out


def _mask(
    g: Group, layout: torch.Tensor | None, block_size: int, causal: bool, window: tuple[int, int] = (-1, -1)
) -> torch.Tensor:
    qb, kb = g.q_pos // block_size, g.k_pos // block_size
    allowed = torch.ones(1, *qb.shape, kb.shape[1], dtype=torch.bool)
    if layout is not None:
        heads_layout = layout[g.heads] if layout.shape[0] > 1 else layout
        allowed = heads_layout[:, qb[:, :, None], kb[:, None, :]]
    allowed = allowed.permute(1, 0, 2, 3)
    difference = g.k_pos[:, None, :] - g.q_pos[:, :, None]  # key minus query position, (G, Tq, K)
    if causal:
        allowed = allowed & (difference <= 0)[:, None]
    if window[0] >= 0:
        allowed = allowed & (difference >= -window[0])[:, None]
    if window[1] >= 0:
        allowed = allowed & (difference <= window[1])[:, None]
    return allowed.contiguous()
