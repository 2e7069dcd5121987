"""The ring schedule: forward and backward steps of a :class:`~ring_core.ring_plan.RingPlan`.

At step ``j`` of ``P - 1``, rank ``t`` receives from ``t - j`` and sends to ``t + j``
(one exchange of :mod:`ring_core.comm`: NCCL's ``batch_isend_irecv`` or the GPUs' copy
engines), while the blocks of step ``j - 1`` are computed. Backward fetches K/V again
and returns the dK/dV of remote keys to their owner in float32 (float64 for float64
inputs), with part of the local blocks held back to overlap the last return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from .comm import CHANNELS, Exchange, RingComm
from .dilated import Block, Part, backward_block, forward_block
from .engine import Accumulator, BlockKernel, BlockSchedule
from .kernels import accumulation_dtype
from .ring_plan import Item, RingPlan, Step, Transfer, _part_kv_heads, _part_rows, item_kv_part

__all__ = ["RingDilatedSchedule", "send_bounds"]

# A key run's (k rows, v rows, kept-key mask or None), as forward_block/backward_block take them.
_KV = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]
# Per key run, the shapes of its tensors in a flat buffer.
_Shapes = list[list[tuple[int, ...]]]


def _block_cost(q_part: Part, kv_part: Part, causal: bool) -> float:
    """Relative work of a block: query rows x key rows x heads (half of it on a causal diagonal)."""
    heads = len(range(q_part.heads.start, q_part.heads.stop, q_part.heads.step))
    return _part_rows(q_part) * _part_rows(kv_part) * heads * (0.5 if causal else 1.0)


def _overlap_split(costs: Sequence[float]) -> int:
    """Where to cut the local blocks: the shortest tail holding at least two thirds of their work."""
    total, tail = sum(costs), 0.0
    for index in range(len(costs) - 1, -1, -1):
        tail += costs[index]
        if tail >= 2 * total / 3:
            return index
    return 0


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
    def _shapes(self, parts: tuple[Part, ...], k: torch.Tensor, v: torch.Tensor, grads: bool = False) -> _Shapes:
        shapes: _Shapes = []
        for part in parts:
            b, rows, heads = k.shape[0], _part_rows(part), _part_kv_heads(part, k.shape[2])
            shapes.append([(b, rows, heads, k.shape[3]), (b, rows, heads, v.shape[3])])
            if self.key_padding_mask is not None and not grads:
                shapes[-1].append((b, rows))
        return shapes

    @staticmethod
    def _numel(shapes: _Shapes) -> int:
        return sum(int(torch.Size(s).numel()) for group in shapes for s in group)

    @staticmethod
    def _unpack(buffer: torch.Tensor, shapes: _Shapes) -> list[list[torch.Tensor]]:
        flat = [s for group in shapes for s in group]
        tensors = [t.view(s) for t, s in zip(buffer.split([int(torch.Size(s).numel()) for s in flat]), flat)]
        out: list[list[torch.Tensor]] = []
        index = 0
        for group in shapes:
            out.append(tensors[index : index + len(group)])
            index += len(group)
        return out

    def _local_kv(self, part: Part, k: torch.Tensor, v: torch.Tensor) -> _KV:
        return part.gather_kv(k), part.gather_kv(v), part.key_mask(self.key_padding_mask)

    def _start_kv(self, j: int, k: torch.Tensor, v: torch.Tensor) -> Exchange | None:
        if j > len(self.plan.steps):
            return None
        step = self.plan.steps[j - 1]
        send = None
        mask = self.key_padding_mask
        if step.send.kv_parts:
            shapes = self._shapes(step.send.kv_parts, k, v)
            send = self.comm.empty("send", self._numel(shapes), k)
            for part, (kb, vb, *kept) in zip(step.send.kv_parts, self._unpack(send, shapes)):
                kb.copy_(part.gather_kv(k))
                vb.copy_(part.gather_kv(v))
                if mask is not None:  # its kept-key flags travel with the rows (see _shapes)
                    kept[0].copy_(~mask[:, part.positions()])
        recv_numel = self._numel(self._shapes(step.recv.kv_parts, k, v))
        return self.comm.exchange(send, step.send_to, recv_numel, step.recv_from, k)

    def _received(self, transfer: Transfer, buffer: torch.Tensor | None, k: torch.Tensor, v: torch.Tensor) -> list[_KV]:
        """``(k_block, v_block, mask)`` per key slot of a received transfer."""
        if not transfer.kv_parts:
            return []
        assert buffer is not None, "an exchange that receives key runs returns their buffer"
        slots: list[_KV] = []
        for kb, vb, *kept in self._unpack(buffer, self._shapes(transfer.kv_parts, k, v)):
            slots.append((kb, vb, kept[0].bool()[:, None, None, :] if kept else None))
        return slots

    @staticmethod
    def _item_kv(item: Item, slot: _KV) -> _KV:
        """The rows of a received slot that ``item`` sees."""
        if item.keys is None:
            return slot
        lo, hi = item.keys
        kb, vb, mask = slot
        return kb[:, lo:hi], vb[:, lo:hi], None if mask is None else mask[..., lo:hi]

    def _local_blocks(self, k: torch.Tensor, v: torch.Tensor) -> list[tuple[Block, _KV]]:
        """The blocks of this rank's own keys, in order, each with its ``(k, v, mask)``."""
        blocks = [(block, self._local_kv(block.kv, k, v)) for block in self.plan.local_blocks]
        for item in self.plan.local.items:
            kv_part = item_kv_part(self.plan.local, item)
            blocks.append((Block(item.q_part, kv_part, window=item.window), self._local_kv(kv_part, k, v)))
        return blocks

    @staticmethod
    def _split_block(block: Block, kv: _KV) -> list[tuple[Block, _KV]]:
        """A single local block (dense, non-causal, contiguous) as a third and two thirds of its query rows, so
        that backward can hide the first K/V fetch and the last dK/dV return behind the two."""
        q_part = block.q
        rows = q_part.stop - q_part.start
        if block.causal or block.window is not None or rows != q_part.segment_rows or rows < 3:
            return [(block, kv)]  # only one non-causal, unwindowed segment splits by rows
        cut = q_part.start + rows // 3
        parts = (
            replace(q_part, stop=cut, length=cut - q_part.start),
            replace(q_part, start=cut, length=q_part.stop - cut),
        )
        return [(replace(block, q=part), kv) for part in parts]

    # -- forward ---------------------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: Accumulator) -> None:
        """Merge this rank's blocks into ``acc`` (``(B, N/P, H, D)`` shards).

        The peers' K/V rows arrive as the plan says, while the local blocks are computed.
        """
        self.comm.begin("forward")
        self.comm.reserve("send", self.send_bounds.get("send", 0), q.device)
        pending = self._start_kv(1, k, v)
        block_id = self.block_base
        for block, kv in self._local_blocks(k, v):
            forward_block(
                self.kernel, block.q, q, *kv, acc, causal=block.causal, block_id=block_id, window=block.window
            )
            block_id += 1
        for j, step in enumerate(self.plan.steps, start=1):
            buffer = pending.wait() if pending is not None else None
            pending = self._start_kv(j + 1, k, v)
            slots = self._received(step.recv, buffer, k, v)
            for item in step.recv.items:
                kv = self._item_kv(item, slots[item.slot])
                forward_block(
                    self.kernel, item.q_part, q, *kv, acc, causal=False, block_id=block_id, window=item.window
                )
                block_id += 1

    # -- backward --------------------------------------------------------------------------------------
    def backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
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
            local = [(local[0][0], split) for split in self._split_block(*local[0][1])]
        costs = [_block_cost(block.q, block.kv, block.causal) for _, (block, _) in local]
        split = _overlap_split(costs) if self.plan.steps else len(local)

        def local_backward(blocks: list[tuple[int, tuple[Block, _KV]]]) -> None:
            for block_id, (block, kv) in blocks:
                block_dk, block_dv = backward_block(
                    self.kernel, block.q, q, *kv, out, lse, dout, dq, causal=block.causal, block_id=block_id,
                    window=block.window,
                )  # fmt: skip
                block.kv.add_kv_grad(dk, block_dk, self.kernel.accumulate)
                block.kv.add_kv_grad(dv, block_dv, self.kernel.accumulate)

        local_backward(local[:split])
        block_id = steps_block_id
        returning: tuple[Exchange, Step] | None = None
        for j, step in enumerate(self.plan.steps, start=1):
            buffer = pending.wait() if pending is not None else None
            pending = self._start_kv(j + 1, k, v)
            slots = self._received(step.recv, buffer, k, v)
            # dK/dV of the sender's key runs, summed per slot in one flat buffer, go back to it
            send: torch.Tensor | None = None
            slot_grads: list[list[torch.Tensor]] = []
            written: set[int] = set()
            if slots:
                grad_shapes = self._shapes(step.recv.kv_parts, k, v, grads=True)
                send = self.comm.empty("grad", self._numel(grad_shapes), dk)
                slot_grads = self._unpack(send, grad_shapes)
            for item in step.recv.items:
                block_grads = backward_block(
                    self.kernel, item.q_part, q, *self._item_kv(item, slots[item.slot]), out, lse, dout, dq,
                    causal=False, block_id=block_id, window=item.window,
                )  # fmt: skip
                if item.keys is not None and item.slot not in written:  # a part of the slot: the rest stays 0
                    for grad in slot_grads[item.slot]:
                        grad.zero_()
                    written.add(item.slot)
                for grad, block_grad in zip(slot_grads[item.slot], block_grads, strict=True):
                    if item.keys is not None:
                        self.kernel.accumulate(grad[:, item.keys[0] : item.keys[1]], block_grad)
                    elif item.slot not in written:  # the slot's first block is written, later ones added
                        grad.copy_(block_grad)
                    else:
                        self.kernel.accumulate(grad, block_grad)
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

    def _add_returned(
        self, exchange: Exchange, step: Step, k: torch.Tensor, v: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor
    ) -> None:
        buffer = exchange.wait()
        if not step.send.kv_parts:
            return
        assert buffer is not None, "an exchange that receives dK/dV returns their buffer"
        returned = self._unpack(buffer, self._shapes(step.send.kv_parts, k, v, grads=True))
        for part, (part_dk, part_dv) in zip(step.send.kv_parts, returned):
            part.add_kv_grad(dk, part_dk, self.kernel.accumulate)
            part.add_kv_grad(dv, part_dv, self.kernel.accumulate)


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
