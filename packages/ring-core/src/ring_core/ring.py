"""Ring attention over a ``torch.distributed`` process group: exact dilated (and dense) attention.

Each rank holds a shard of the sequence (layout ``"contiguous"`` or ``"zigzag"``,
see :mod:`ring_core.sharding`). A shard is one or two contiguous *pieces* of
global positions. For a dilated branch ``(w, r)`` and offset ``o`` the selected
positions of a piece fall into *runs*, one per segment they touch:

- runs inside one piece are computed locally, batched by segment, exactly like
  :class:`~ring_core.dilated.DilatedSchedule` (causal within the run);
- two pieces share at most one segment; when a piece of rank ``s`` shares a
  segment with a piece of rank ``t``, ``s`` sends ``t`` only the selected rows of
  that run, and only the key/value heads of the offset's query heads. Causally,
  a piece that lies entirely after the query piece is skipped (nothing sent).

So a branch whose segments fit inside every shard sends nothing, and dense
attention (``segment_lengths=[w >= N]``, rate 1) is the classic ring with the
causal blocks skipped. At step ``j`` of ``P - 1``, rank ``t`` receives from
``t - j`` and sends to ``t + j`` (one exchange of :mod:`ring_core.comm`: NCCL's
``batch_isend_irecv`` or the GPUs' copy engines), while the blocks of step
``j - 1`` are computed. Backward fetches K/V again and returns the dK/dV of
remote keys to their owner in float32 (float64 for float64 inputs).

Everything is one :class:`~ring_core.engine.BlockSchedule` run through
:func:`~ring_core.engine.blockwise_attention`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .comm import CHANNELS, Exchange, RingComm, RingCommStats, check_transport, ring_comm
from .dilated import Branch, DilatedSchedule, Part, branches
from .engine import Accumulator, BlockKernel, BlockSchedule, blockwise_attention
from .kernels import FLOAT_DTYPES, KernelRequest, accumulation_dtype, default_scale
from .registry import select_kernel
from .sharding import LAYOUTS, check_layout, shard_ranges
from .validation import MERGES, check_dilated_config, check_dropout, check_qkv

__all__ = [
    "Exchange",
    "RingAttentionBase",
    "RingComm",
    "RingCommStats",
    "RingConfigError",
    "RingDilatedAttention",
    "RingDilatedSchedule",
    "RingPlan",
    "Transfer",
    "agree_across_ranks",
    "build_ring_plan",
    "differing_fields",
    "offset_heads",
    "ring_dilated_attention",
    "send_bounds",
    "validate_ring_inputs",
]


# -- the plan: which blocks exist and who sends what to whom ------------------------------------


@dataclass(frozen=True)
class Run:
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


def part_rows(part: Part) -> int:
    return part.stop - part.start


def part_kv_heads(part: Part, num_kv_heads: int) -> int:
    heads = part.kv_heads
    return len(range(*heads.indices(num_kv_heads))) if isinstance(heads, slice) else int(heads.numel())


def offset_heads(branch: Branch, offset: int, groups: int, device: torch.device) -> tuple[slice, Any] | None:
    """Query heads of ``branch`` at dilation ``offset`` and the key/value heads they read, or None if none.

    ``groups`` is ``H // H_kv``. The key/value heads are a slice when the kernel's GQA
    can serve them (each one read by the same number of consecutive query heads), else an
    index tensor on ``device``.
    """
    r = branch.rate
    first = branch.head_start + (offset - branch.head_start) % r
    if first >= branch.head_stop:
        return None
    heads = slice(first, branch.head_stop, r)
    if groups == 1:
        return heads, heads
    kv = [h // groups for h in range(first, branch.head_stop, r)]
    unique = sorted(set(kv))
    repeat = len(kv) // len(unique)
    if len(kv) == repeat * len(unique) and all(
        kv[i] == unique[i // repeat] for i in range(len(kv))
    ):  # each kv head for `repeat` q heads: GQA
        step = unique[1] - unique[0] if len(unique) > 1 else 1
        if unique == list(range(unique[0], unique[-1] + 1, step)):
            return heads, slice(unique[0], unique[-1] + 1, step)
        return heads, torch.tensor(unique, device=device)
    return heads, torch.tensor(kv, device=device)


def _runs(start: int, stop: int, branch: Branch, offset: int) -> tuple[int, list[Run]]:
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
        runs = [Run(seg0, 0, head + full * m, m)]
    else:
        runs = [Run(seg0, 0, head, head)]
        if full:
            runs.append(Run(seg0 + 1, head, head + full * m, m))
    if tail:
        runs.append(Run(seg0 + 1 + full, head + full * m, count, tail))
    return first, runs


def _run_for_segment(runs: list[Run], segment: int) -> tuple[int, int] | None:
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
) -> RingPlan:
    """The blocks of ``rank`` for a global sequence of ``seq_len`` (cached)."""
    groups = num_heads // num_kv_heads
    pieces = [shard_ranges(seq_len, p, world_size, layout) for p in range(world_size)]

    def local_start(p: int, index: int) -> int:
        return sum(b - a for a, b in pieces[p][:index])

    # runs[p][piece][(branch, offset)] = (first local position, runs)
    runs: list[list[dict[tuple[int, int], tuple[int, list[Run]]]]] = []
    heads_of: dict[tuple[int, int], tuple[slice, Any]] = {}
    for bi, branch in enumerate(branch_list):
        for offset in range(branch.rate):
            selected = offset_heads(branch, offset, groups, device)
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


def _last_segment(runs: list[Run]) -> int:
    last = runs[-1]
    return last.segment + (last.i1 - last.i0) // last.length - 1


def _block_cost(q_part: Part, kv_part: Part, causal: bool) -> float:
    """Relative work of a block: query rows x key rows x heads (half of it on a causal diagonal)."""
    heads = len(range(q_part.heads.start, q_part.heads.stop, q_part.heads.step))
    return part_rows(q_part) * part_rows(kv_part) * heads * (0.5 if causal else 1.0)


def _overlap_split(costs: Sequence[float]) -> int:
    """Where to cut the local blocks: the shortest tail holding at least two thirds of their work."""
    total, tail = sum(costs), 0.0
    for index in range(len(costs) - 1, -1, -1):
        tail += costs[index]
        if tail >= 2 * total / 3:
            return index
    return 0


# -- the schedule --------------------------------------------------------------------------------


class RingDilatedSchedule(BlockSchedule):
    """Dilated (and dense) attention of this rank's shard; key runs come from the peers that hold them."""

    def __init__(
        self,
        kernel: BlockKernel,
        plan: RingPlan,
        comm: RingComm,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        send_bounds: dict[str, int] | None = None,
    ) -> None:
        self.kernel = kernel
        self.plan = plan
        self.comm = comm
        self.causal = causal
        self.key_padding_mask = key_padding_mask
        self.send_bounds = send_bounds or {}  # per use, bytes no send of any rank exceeds (copy-engine slots)
        self.block_base = comm.rank * 1_000_003

    # -- payloads: per key run its k rows, v rows and (with padding) kept-key flags, flat ------------
    def _shapes(self, parts: tuple[Part, ...], k: torch.Tensor, v: torch.Tensor, grads: bool = False):
        shapes = []
        for part in parts:
            b, rows, heads = k.shape[0], part_rows(part), part_kv_heads(part, k.shape[2])
            shapes.append([(b, rows, heads, k.shape[3]), (b, rows, heads, v.shape[3])])
            if self.key_padding_mask is not None and not grads:
                shapes[-1].append((b, rows))
        return shapes

    @staticmethod
    def _numel(shapes) -> int:
        return sum(int(torch.Size(s).numel()) for group in shapes for s in group)

    @staticmethod
    def _unpack(buffer: torch.Tensor, shapes) -> list[list[torch.Tensor]]:
        flat = [s for group in shapes for s in group]
        tensors = [t.view(s) for t, s in zip(buffer.split([int(torch.Size(s).numel()) for s in flat]), flat)]
        out, index = [], 0
        for group in shapes:
            out.append(tensors[index : index + len(group)])
            index += len(group)
        return out

    def _local_kv(self, part: Part, k: torch.Tensor, v: torch.Tensor):
        return part.gather_kv(k), part.gather_kv(v), part.key_mask(self.key_padding_mask)

    def _start_kv(self, j: int, k: torch.Tensor, v: torch.Tensor) -> Exchange | None:
        if j > len(self.plan.steps):
            return None
        step = self.plan.steps[j - 1]
        send = None
        if step.send.kv_parts:
            shapes = self._shapes(step.send.kv_parts, k, v)
            send = self.comm.empty("send", self._numel(shapes), k)
            for part, (kb, vb, *kept) in zip(step.send.kv_parts, self._unpack(send, shapes)):
                kb.copy_(part.gather_kv(k))
                vb.copy_(part.gather_kv(v))
                if kept:
                    kept[0].copy_(~self.key_padding_mask[:, part.positions()])
        recv_numel = self._numel(self._shapes(step.recv.kv_parts, k, v))
        return self.comm.exchange(send, step.send_to, recv_numel, step.recv_from, k)

    def _received(self, transfer: Transfer, buffer: torch.Tensor | None, k, v):
        """``(k_block, v_block, mask)`` per key slot of a received transfer."""
        if not transfer.kv_parts:
            return []
        slots = []
        for kb, vb, *kept in self._unpack(buffer, self._shapes(transfer.kv_parts, k, v)):
            slots.append((kb, vb, kept[0].bool()[:, None, None, :] if kept else None))
        return slots

    def _local_blocks(self, k, v) -> list[tuple[Part, Part, tuple, bool]]:
        """The blocks of this rank's own keys, in order: ``(q_part, kv_part, (k, v, mask), causal)``."""
        blocks = [(part, part, self._local_kv(part, k, v), self.causal) for part in self.plan.local_parts]
        kv = [self._local_kv(part, k, v) for part in self.plan.local.kv_parts]
        blocks += [
            (item.q_part, self.plan.local.kv_parts[item.slot], kv[item.slot], False) for item in self.plan.local.items
        ]
        return blocks

    @staticmethod
    def _split_block(q_part: Part, kv_part: Part, kv: tuple, causal: bool) -> list[tuple]:
        """A single local block (dense, non-causal, contiguous) as a third and two thirds of its query rows, so
        that backward can hide the first K/V fetch and the last dK/dV return behind the two."""
        rows = q_part.stop - q_part.start
        if causal or rows != q_part.length or rows < 3:  # only one non-causal segment splits by rows
            return [(q_part, kv_part, kv, causal)]
        cut = q_part.start + rows // 3
        parts = (
            replace(q_part, stop=cut, length=cut - q_part.start),
            replace(q_part, start=cut, length=q_part.stop - cut),
        )
        return [(part, kv_part, kv, causal) for part in parts]

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, q, k, v, acc: Accumulator) -> None:
        self.comm.begin("forward")
        self.comm.reserve("send", self.send_bounds.get("send", 0), q.device)
        pending = self._start_kv(1, k, v)
        block_id = self.block_base
        for q_part, _, kv, causal in self._local_blocks(k, v):
            self._forward_block(q_part, q, *kv, acc, causal, block_id)
            block_id += 1
        for j, step in enumerate(self.plan.steps, start=1):
            buffer = pending.wait() if pending is not None else None
            pending = self._start_kv(j + 1, k, v)
            slots = self._received(step.recv, buffer, k, v)
            for item in step.recv.items:
                self._forward_block(item.q_part, q, *slots[item.slot], acc, False, block_id)
                block_id += 1

    def _forward_block(self, part: Part, q, kb, vb, mask, acc: Accumulator, causal: bool, block_id: int) -> None:
        self.kernel.forward_into(
            part.view(acc.out), part.view(acc.lse), part.view(q).flatten(0, 1), kb, vb,
            causal=causal, mask=mask, block_id=block_id,
        )  # fmt: skip

    # -- backward --------------------------------------------------------------------------------------
    def _backward_block(self, part: Part, q, kb, vb, mask, out, lse, dout, dq, causal: bool, block_id: int):
        block_dq, block_dk, block_dv = self.kernel.backward(
            part.view(dout).flatten(0, 1), part.view(q).flatten(0, 1), kb, vb,
            part.view(out).flatten(0, 1), part.view(lse).flatten(0, 1),
            causal=causal, mask=mask, block_id=block_id,
        )  # fmt: skip
        view = part.view(dq)
        self.kernel.accumulate(view, block_dq.unflatten(0, view.shape[:2]))
        return block_dk, block_dv

    def backward(self, q, k, v, out, lse, dout, grads) -> None:
        """Local blocks around the ring steps: a few while the first peer's K/V arrive, the rest (about two
        thirds of the local work) while the last dK/dV (float32, twice the bytes) travel home."""
        self.comm.begin("backward")
        for use in CHANNELS:
            self.comm.reserve(use, self.send_bounds.get(use, 0), q.device)
        dq, dk, dv = grads
        pending = self._start_kv(1, k, v)
        local = list(enumerate(self._local_blocks(k, v), start=self.block_base))
        steps_block_id = self.block_base + len(local)
        if self.plan.steps and len(local) == 1 and self.kernel.dropout_p == 0:  # (a block's mask is per block)
            local = [(local[0][0], block) for block in self._split_block(*local[0][1])]
        costs = [_block_cost(q_part, kv_part, causal) for _, (q_part, kv_part, _, causal) in local]
        split = _overlap_split(costs) if self.plan.steps else len(local)

        def local_backward(blocks) -> None:
            for block_id, (q_part, kv_part, kv, causal) in blocks:
                block_dk, block_dv = self._backward_block(q_part, q, *kv, out, lse, dout, dq, causal, block_id)
                kv_part.add_kv_grad(dk, block_dk, self.kernel.accumulate)
                kv_part.add_kv_grad(dv, block_dv, self.kernel.accumulate)

        local_backward(local[:split])
        block_id = steps_block_id
        returning: tuple[Exchange, Step] | None = None
        for j, step in enumerate(self.plan.steps, start=1):
            buffer = pending.wait() if pending is not None else None
            pending = self._start_kv(j + 1, k, v)
            slots = self._received(step.recv, buffer, k, v)
            # dK/dV of the sender's key runs, summed per slot in one flat buffer, go back to it
            send, slot_grads, written = None, [], set()
            if slots:
                grad_shapes = self._shapes(step.recv.kv_parts, k, v, grads=True)
                send = self.comm.empty("grad", self._numel(grad_shapes), dk)
                slot_grads = self._unpack(send, grad_shapes)
            for item in step.recv.items:
                block_grads = self._backward_block(
                    item.q_part, q, *slots[item.slot], out, lse, dout, dq, False, block_id
                )
                for grad, block_grad in zip(slot_grads[item.slot], block_grads, strict=True):
                    # the slot's first block is written, later ones added (no zero-filled buffer)
                    grad.copy_(block_grad) if item.slot not in written else self.kernel.accumulate(grad, block_grad)
                written.add(item.slot)
                block_id += 1
            for slot in set(range(len(slot_grads))) - written:
                for grad in slot_grads[slot]:
                    grad.zero_()
            recv_numel = self._numel(self._shapes(step.send.kv_parts, k, v, grads=True))
            exchange = self.comm.exchange(send, step.recv_from, recv_numel, step.send_to, dk, use="grad")
            if returning is not None:
                self._add_returned(*returning, k, v, dk, dv)
            returning = (exchange, step)
        local_backward(local[split:])
        if returning is not None:
            self._add_returned(*returning, k, v, dk, dv)

    def _add_returned(self, exchange: Exchange, step: Step, k, v, dk, dv) -> None:
        buffer = exchange.wait()
        if not step.send.kv_parts:
            return
        returned = self._unpack(buffer, self._shapes(step.send.kv_parts, k, v, grads=True))
        for part, (part_dk, part_dv) in zip(step.send.kv_parts, returned):
            part.add_kv_grad(dk, part_dk, self.kernel.accumulate)
            part.add_kv_grad(dv, part_dv, self.kernel.accumulate)


# -- validation: once per new shape/config, the same error on every rank ----------------------


class RingConfigError(ValueError):
    """Ranks disagree on shapes, dtypes or configuration, or one rank rejected its inputs."""


_DESCRIPTOR_FIELDS = (
    "ok",
    "batch",
    "local_len",
    "heads",
    "kv_heads",
    "head_dim",
    "value_dim",
    "dtype",
    "device_type",
    "causal",
    "padding",
    "layout",
    "merge",
    "config",
    "scale",
)


def _describe(q, k, v, key_padding_mask, causal: bool, layout: str, merge: str, config: tuple, scale) -> list[int]:
    b, n, h, d = q.shape
    return [
        1,
        b,
        n,
        h,
        k.shape[2],
        d,
        v.shape[3],
        FLOAT_DTYPES.index(q.dtype) if q.dtype in FLOAT_DTYPES else -1,
        0 if q.device.type == "cpu" else 1,
        int(causal),
        int(key_padding_mask is not None),
        LAYOUTS.index(layout),
        MERGES.index(merge),
        zlib.crc32(repr(config).encode()),
        zlib.crc32(repr(scale).encode()),
    ]


def _descriptor_device(group: Any, q: Any) -> torch.device:
    if isinstance(q, torch.Tensor) and q.device.type != "cpu":
        return q.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_across_ranks(
    check: Callable[[], Sequence[int]], fields: Sequence[str], comm: RingComm, *, name: str, like: Any = None
) -> list[list[int]]:
    """Run this rank's ``check``, then one small ``all_gather`` in ``comm``, so every rank raises (or none does).

    ``check`` raises ``TypeError``/``ValueError`` on bad input, else returns one int per
    entry of ``fields`` (the first, ``"ok"``, is 1). A rank whose check failed raises its
    error after the all-gather; the others raise :class:`RingConfigError` naming it (messages
    start with ``name``). Returns the gathered table, one row per rank; ``like`` (a tensor
    or None) picks the device of the all-gather with the group's backend.
    """
    local_error: Exception | None = None
    try:
        descriptor = list(check())
    except (TypeError, ValueError) as exc:
        local_error = exc
        descriptor = [0] * len(fields)
    if comm.world_size > 1:
        mine = torch.tensor(descriptor, dtype=torch.int64, device=_descriptor_device(comm.group, like))
        gathered = [torch.empty_like(mine) for _ in range(comm.world_size)]
        dist.all_gather(gathered, mine, group=comm.group)
        table = [t.tolist() for t in gathered]
    else:
        table = [descriptor]
    if local_error is not None:
        raise local_error
    failed = [r for r, row in enumerate(table) if row[0] == 0]
    if failed:
        raise RingConfigError(
            f"{name}: rank(s) {failed} of {comm.world_size} rejected their inputs (see the error "
            f"raised there); nothing was computed"
        )
    return table


def differing_fields(table: list[list[int]], fields: Sequence[str]) -> tuple[list[str], str]:
    """The ``fields`` whose values differ between the rows (ranks) of ``table``, and ``"field: rank 0=a, ..."``."""
    differing = [field for i, field in enumerate(fields) if len({row[i] for row in table}) > 1]
    details = "; ".join(
        f"{field}: " + ", ".join(f"rank {r}={row[fields.index(field)]}" for r, row in enumerate(table))
        for field in differing
    )
    return differing, details


def validate_ring_inputs(
    q,
    k,
    v,
    key_padding_mask,
    *,
    causal: bool,
    layout: str,
    merge: str,
    config: tuple,
    scale,
    comm: RingComm,
    name: str = "RingDilatedAttention",
) -> None:
    """Local checks, then one small ``all_gather`` in ``comm`` so every rank raises the same error (or none).

    ``config`` (any repr-able tuple) and ``scale`` must match on every rank; errors start with ``name``.
    """

    def check() -> list[int]:
        check_qkv(q, k, v, key_padding_mask)
        return _describe(q, k, v, key_padding_mask, causal, layout, merge, config, scale)

    table = agree_across_ranks(check, _DESCRIPTOR_FIELDS, comm, name=name, like=q)
    differing, details = differing_fields(table, _DESCRIPTOR_FIELDS)
    if differing:
        hint = ""
        if "local_len" in differing:
            hint = " (the global sequence length N must be divisible by the world size P, every rank holding N/P)"
        raise RingConfigError(
            f"{name}: ranks passed different shapes/dtypes/configurations: {details}{hint}; "
            f"dtype codes index {[str(d).replace('torch.', '') for d in FLOAT_DTYPES]}"
        )
    local_len = table[0][2]
    if layout == "zigzag" and comm.world_size > 1 and local_len % 2 != 0:
        raise RingConfigError(
            f"layout='zigzag' needs N divisible by 2*P: each of the {comm.world_size} ranks holds {local_len} "
            f"positions (N={local_len * comm.world_size}), which is odd"
        )


# -- public API ----------------------------------------------------------------------------------


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


def _run(
    q,
    k,
    v,
    *,
    comm: RingComm,
    branch_cfg,
    merge,
    layout,
    is_causal,
    key_padding_mask,
    softmax_scale,
    dropout_p,
    kernel,
) -> tuple[torch.Tensor, torch.Tensor]:
    segments, rates = branch_cfg
    seq_len = q.shape[1] * comm.world_size
    branch_list = tuple(branches(segments, rates, merge, q.shape[2]))
    request = KernelRequest.for_tensors(
        q, k, causal=is_causal, has_mask=key_padding_mask is not None, dropout_p=dropout_p
    )
    backend = select_kernel(request, kernel)
    seed = int(torch.randint(0, 2**40, (1,)).item()) if dropout_p > 0 else 0
    block_kernel = BlockKernel(backend, default_scale(q.shape[-1], softmax_scale), dropout_p, seed)
    comm.stats.calls += 1
    if segments_within_shards(q.shape[1], comm.world_size, layout, segments):
        # nothing to exchange: the single-device schedule on this shard computes the same blocks
        schedule = DilatedSchedule(block_kernel, branch_list, causal=is_causal, key_padding_mask=key_padding_mask)
    else:
        plan = build_ring_plan(
            seq_len, comm.world_size, comm.rank, layout, branch_list, q.shape[2], k.shape[2], bool(is_causal), q.device
        )
        schedule = RingDilatedSchedule(
            block_kernel, plan, comm, causal=is_causal, key_padding_mask=key_padding_mask,
            send_bounds=send_bounds(q, k, v, len(branch_list)),
        )  # fmt: skip
    return blockwise_attention(schedule, q, k, v)


def send_bounds(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_branches: int) -> dict[str, int]:
    """Bytes that no send of any rank exceeds, per use: per branch each (position, key/value head) of a shard
    travels at most once, as K/V with its padding flag in the inputs' dtype (``"send"``) or as dK/dV in the
    accumulation dtype (``"grad"``)."""
    b, n, h_kv, d = k.shape
    rows = num_branches * b * n
    return {
        "send": rows * (h_kv * (d + v.shape[-1]) + 1) * k.element_size(),
        "grad": rows * h_kv * (d + v.shape[-1]) * accumulation_dtype(q.dtype).itemsize,
    }


def ring_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str = "lse",
    layout: str = "contiguous",
    process_group: Any = None,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    kernel: str | None = None,
    stats: RingCommStats | None = None,
    transport: str = "nccl",
) -> torch.Tensor:
    """Ring dilated attention of this rank's shard ``(B, N/P, H, D)``; returns this rank's output shard.

    ``key_padding_mask`` is this rank's shard ``(B, N/P)`` (True = padding). Validates
    (collectively) on every call; :class:`RingDilatedAttention` validates once per shape.
    ``transport``: see :class:`RingDilatedAttention`.
    """
    segments, rates = check_dilated_config(segment_lengths, dilation_rates, merge)
    check_layout(layout)
    dropout_p = check_dropout(dropout_p)
    comm = ring_comm(process_group, stats or RingCommStats(), check_transport(transport), q.device)
    config = (segments, rates, merge, layout, dropout_p)
    validate_ring_inputs(
        q,
        k,
        v,
        key_padding_mask,
        causal=bool(is_causal),
        layout=layout,
        merge=merge,
        config=config,
        scale=softmax_scale,
        comm=comm,
    )
    out, _ = _run(
        q,
        k,
        v,
        comm=comm,
        branch_cfg=(segments, rates),
        merge=merge,
        layout=layout,
        is_causal=bool(is_causal),
        key_padding_mask=key_padding_mask,
        softmax_scale=softmax_scale,
        dropout_p=dropout_p,
        kernel=kernel,
    )
    return out


class RingAttentionBase(nn.Module):
    """The constructor of the ring attention modules: checks, normalises and stores their common arguments.

    ``segment_lengths`` and ``dilation_rates`` become tuples of ints; ``layout``,
    ``merge``, ``dropout``, ``kernel`` (a kernel backend name or None) and ``transport``
    (:data:`ring_core.comm.TRANSPORTS`) are checked. Subclasses get :attr:`comm_stats` (bytes
    this rank sends) and an empty ``_validated`` set (keys of the input signatures
    already validated across ranks), and define ``forward``.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        merge: str = "lse",
        layout: str = "contiguous",
        process_group: Any = None,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        kernel: str | None = None,
        *,
        transport: str = "nccl",
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_dilated_config(segment_lengths, dilation_rates, merge)
        self.merge = merge
        self.layout = check_layout(layout)
        self.process_group = process_group
        self.softmax_scale = softmax_scale
        self.dropout = check_dropout(dropout)
        if kernel is not None and not isinstance(kernel, str):
            raise TypeError(f"kernel must be a kernel backend name or None, got {kernel!r}")
        self.kernel = kernel
        self.transport = check_transport(transport)
        self.comm_stats = RingCommStats()
        self._validated: set[tuple] = set()

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"merge={self.merge!r}, layout={self.layout!r}, dropout={self.dropout}"
        )


class RingDilatedAttention(RingAttentionBase):
    """Exact LongNet dilated (and dense) attention with the sequence sharded over a process group.

    ``attn(q_local, k_local, v_local, *, is_causal=False, key_padding_mask=None)`` takes
    this rank's shard ``(B, N/P, H, D)`` (layout ``"contiguous"`` or ``"zigzag"``, see
    :func:`ring_core.shard_sequence`) and returns this rank's output shard.
    ``process_group=None`` is the default group when one is initialised, else one
    process. Bytes sent by this rank are counted in :attr:`comm_stats`.

    ``transport``: ``"nccl"`` (default) moves K/V and dK/dV with ``batch_isend_irecv`` of the
    group's backend; ``"copy_engine"`` with the GPUs' copy engines
    (:class:`~ring_core.comm.CopyEngineComm`: no SMs taken from the kernels; CUDA tensors in
    an NCCL group on one host, else a clear error on every rank).
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        comm = ring_comm(self.process_group, self.comm_stats, self.transport, q.device)
        dropout_p = self.dropout if self.training else 0.0
        self._check(q, k, v, key_padding_mask, bool(is_causal), dropout_p, comm)
        return self._attend(q, k, v, bool(is_causal), key_padding_mask, dropout_p, comm)

    def _check(self, q, k, v, key_padding_mask, is_causal: bool, dropout_p: float, comm: RingComm) -> None:
        """Inputs agree across ranks (checked once per new signature, errors naming this class)."""
        config = (self.segment_lengths, self.dilation_rates, self.merge, self.layout, dropout_p)
        key = _validation_key(q, k, v, key_padding_mask, is_causal, config, comm.world_size)
        if key not in self._validated:
            validate_ring_inputs(
                q, k, v, key_padding_mask, causal=is_causal, layout=self.layout, merge=self.merge, config=config,
                scale=self.softmax_scale, comm=comm, name=type(self).__name__,
            )  # fmt: skip
            self._validated.add(key)

    def _attend(self, q, k, v, is_causal: bool, key_padding_mask, dropout_p: float, comm: RingComm) -> torch.Tensor:
        """This rank's output shard, inputs already checked."""
        out, _ = _run(
            q, k, v, comm=comm, branch_cfg=(self.segment_lengths, self.dilation_rates), merge=self.merge,
            layout=self.layout, is_causal=is_causal, key_padding_mask=key_padding_mask,
            softmax_scale=self.softmax_scale, dropout_p=dropout_p, kernel=self.kernel,
        )  # fmt: skip
        return out


def _validation_key(q, k, v, key_padding_mask, causal: bool, config: tuple, world_size: int) -> tuple:
    def sig(t: Any) -> Any:
        return (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t)

    return (
        sig(q),
        sig(k),
        sig(v),
        None if key_padding_mask is None else sig(key_padding_mask),
        causal,
        config,
        world_size,
    )
