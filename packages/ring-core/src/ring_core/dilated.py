"""Dilated attention (LongNet) on one device, as a schedule of the blockwise engine.

For branch ``(w, r)`` and offset ``o``, the selected positions ``o, o+r, o+2r, ...``
form a strided view of the sequence; because ``w % r == 0`` their segments are
consecutive runs of ``w // r`` selected positions. So a branch is: a strided
gather, one kernel call over all full segments as a batch (plus one for a shorter
last segment), and a merge back through the same strided view.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .dispatch import block_kernel
from .engine import Accumulator, BlockKernel, BlockSchedule
from .ops import AttentionOp, OpCall, run_attention
from .validation import check_dilated_config, check_dropout, check_qkv

__all__ = [
    "Branch",
    "DilatedAttention",
    "DilatedSchedule",
    "Part",
    "backward_block",
    "branches",
    "dilated_attention",
    "dilated_parts",
    "forward_block",
    "offset_heads",
]


@dataclass(frozen=True)
class Branch:
    """One dilated branch applied to the contiguous query heads ``[head_start, head_stop)``."""

    segment: int
    rate: int
    head_start: int
    head_stop: int


def branches(segment_lengths: Sequence[int], dilation_rates: Sequence[int], merge: str, num_heads: int) -> list[Branch]:
    """The branches of a configuration; ``head_groups`` splits heads, larger groups first."""
    m = len(segment_lengths)
    if merge == "lse":
        return [Branch(w, r, 0, num_heads) for w, r in zip(segment_lengths, dilation_rates)]
    if num_heads < m:
        raise ValueError(
            f"merge='head_groups' needs at least one head per branch: num_heads={num_heads} < "
            f"{m} branches (segment_lengths={list(segment_lengths)})"
        )
    sizes = [num_heads // m + (1 if i < num_heads % m else 0) for i in range(m)]
    starts = [0, *itertools.accumulate(sizes)]
    return [Branch(w, r, starts[i], starts[i + 1]) for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates))]


@dataclass(frozen=True)
class Part:
    """Selected positions ``[start, stop)`` (in units of ``rate``) cut into segments of ``length``."""

    offset: int
    rate: int
    start: int
    stop: int
    length: int
    heads: slice
    kv_heads: torch.Tensor | slice

    def positions(self) -> slice:
        first = self.offset + self.rate * self.start
        return slice(first, self.offset + self.rate * (self.stop - 1) + 1, self.rate)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, nseg, length, h, ...)`` strided view of ``x`` (``(B, N, H, ...)``)."""
        return x[:, self.positions(), self.heads].unflatten(1, (-1, self.length))

    def kv_view(self, x: torch.Tensor) -> torch.Tensor:
        """Like :meth:`view` with the key/value heads (a slice: no grouped-query heads)."""
        return x[:, self.positions(), self.kv_heads].unflatten(1, (-1, self.length))

    def gather_kv(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, self.positions()]
        y = y[:, :, self.kv_heads] if isinstance(self.kv_heads, slice) else y.index_select(2, self.kv_heads)
        return y.unflatten(1, (-1, self.length)).flatten(0, 1)

    def add_kv_grad(
        self,
        grad: torch.Tensor,
        block_grad: torch.Tensor,
        accumulate: Callable[[torch.Tensor, torch.Tensor], object] = torch.Tensor.add_,
    ) -> None:
        """``grad[kv rows] += block_grad``; ``accumulate(view, block)`` adds (grouped-query heads: ``index_add_``)."""
        view = grad[:, self.positions()].unflatten(1, (-1, self.length))
        if isinstance(self.kv_heads, slice):
            accumulate(view[:, :, :, self.kv_heads], block_grad.unflatten(0, view.shape[:2]))
        else:  # kernels may return the input dtype; index_add_ needs one dtype
            view.index_add_(3, self.kv_heads, block_grad.to(grad.dtype).unflatten(0, view.shape[:2]))

    def key_mask(self, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Bool ``(B*nseg, 1, 1, length)``, True where a key is allowed."""
        if key_padding_mask is None:
            return None
        kept = ~key_padding_mask[:, self.positions()].unflatten(1, (-1, self.length))
        return kept.flatten(0, 1)[:, None, None, :]


def offset_heads(
    branch: Branch, offset: int, groups: int, device: torch.device, *, expand: bool = False
) -> tuple[slice, torch.Tensor | slice] | None:
    """Query heads of ``branch`` at dilation ``offset`` and the key/value heads they read, or None if none.

    The query heads are ``h`` in ``[head_start, head_stop)`` with ``h mod rate == offset``, a
    slice. ``groups`` is ``H // H_kv`` (query head ``h`` reads key/value head ``h // groups``).
    The key/value heads are a slice when a kernel's grouped-query attention can serve them (each
    one read by the same number of consecutive query heads), else an index tensor on ``device``;
    with ``expand``, one key/value head per query head (an index tensor when ``groups > 1``), for
    kernels called without GQA.
    """
    r = branch.rate
    first = branch.head_start + (offset - branch.head_start) % r
    if first >= branch.head_stop:
        return None
    heads = slice(first, branch.head_stop, r)
    if groups == 1:
        return heads, heads
    if expand:
        return heads, torch.arange(first, branch.head_stop, r, device=device) // groups
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


def dilated_parts(seq_len: int, branch: Branch, groups: int, device: torch.device) -> Iterator[Part]:
    """Every kernel call of one branch: per offset, the full segments and the shorter last one.

    ``groups`` is ``H // H_kv``: query head ``h`` reads key/value head ``h // groups``.
    """
    r = branch.rate
    for offset in range(r):
        selected = offset_heads(branch, offset, groups, device, expand=True)
        count = len(range(offset, seq_len, r))
        if selected is None or count == 0:
            continue
        heads, kv_heads = selected
        length = min(branch.segment // r, count)
        full = count - count % length
        if full:
            yield Part(offset, r, 0, full, length, heads, kv_heads)
        if full < count:
            yield Part(offset, r, full, count, count - full, heads, kv_heads)


def forward_block(
    kernel: BlockKernel,
    q_part: Part,
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    mask: torch.Tensor | None,
    acc: Accumulator,
    *,
    causal: bool,
    block_id: int,
) -> None:
    """Merge one block into ``acc``: the query rows and heads of ``q_part`` against a key block.

    ``k_block``/``v_block`` are ``(B * nseg, m, h_kv, D)`` (what :meth:`Part.gather_kv`
    returns, here or on the rank that sent them) and ``mask`` is :meth:`Part.key_mask`'s
    (or None). ``block_id`` keeps dropout streams apart: unique per block of a call.
    """
    kernel.forward_into(
        q_part.view(acc.out), q_part.view(acc.lse), q_part.view(q).flatten(0, 1), k_block, v_block,
        causal=causal, mask=mask, block_id=block_id,
    )  # fmt: skip


def backward_block(
    kernel: BlockKernel,
    q_part: Part,
    q: torch.Tensor,
    k_block: torch.Tensor,
    v_block: torch.Tensor,
    mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dq: torch.Tensor,
    *,
    causal: bool,
    block_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact gradient of one block (same arguments as :func:`forward_block`, with the final ``out``/``lse``).

    Adds the block's dq into ``dq``'s rows of ``q_part`` and returns its ``(dk, dv)`` in the
    key block's layout, for :meth:`Part.add_kv_grad` of the key part (here or on its owner).
    """
    block_dq, block_dk, block_dv = kernel.backward(
        q_part.view(dout).flatten(0, 1), q_part.view(q).flatten(0, 1), k_block, v_block,
        q_part.view(out).flatten(0, 1), q_part.view(lse).flatten(0, 1),
        causal=causal, mask=mask, block_id=block_id,
    )  # fmt: skip
    view = q_part.view(dq)
    kernel.accumulate(view, block_dq.unflatten(0, view.shape[:2]))
    return block_dk, block_dv


class DilatedSchedule(BlockSchedule):
    """LongNet dilated attention on one device: all branches, offsets and segments."""

    def __init__(
        self,
        kernel: BlockKernel,
        branch_list: Sequence[Branch],
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
    ) -> None:
        self.kernel = kernel
        self.branches = list(branch_list)
        self.causal = causal
        self.key_padding_mask = key_padding_mask

    def _parts(self, q: torch.Tensor, k: torch.Tensor) -> Iterator[Part]:
        for branch in self.branches:
            yield from dilated_parts(q.shape[1], branch, q.shape[2] // k.shape[2], q.device)

    def forward(self, q, k, v, acc: Accumulator) -> None:
        """Merge each branch's blocks (its segments, gathered) into ``acc``; ``q, k, v``: ``(B, N, H, D)``."""
        for block_id, part in enumerate(self._parts(q, k)):
            kv = (part.gather_kv(k), part.gather_kv(v), part.key_mask(self.key_padding_mask))
            forward_block(self.kernel, part, q, *kv, acc, causal=self.causal, block_id=block_id)

    def backward(self, q, k, v, out, lse, dout, grads) -> None:
        dq, dk, dv = grads
        for block_id, part in enumerate(self._parts(q, k)):
            kv = (part.gather_kv(k), part.gather_kv(v), part.key_mask(self.key_padding_mask))
            block_dk, block_dv = backward_block(
                self.kernel, part, q, *kv, out, lse, dout, dq, causal=self.causal, block_id=block_id
            )
            part.add_kv_grad(dk, block_dk, self.kernel.accumulate)
            part.add_kv_grad(dv, block_dv, self.kernel.accumulate)


class _DilatedOp(AttentionOp):
    """The custom ops' side of :func:`dilated_attention` for one configuration."""

    def __init__(self, segments, rates, merge: str, softmax_scale: float | None, kernel: str | None) -> None:
        super().__init__()
        self.segments, self.rates, self.merge = segments, rates, merge
        self.softmax_scale, self.kernel = softmax_scale, kernel

    def schedule(self, q, k, v, call: OpCall) -> DilatedSchedule:
        mask = call.key_padding_mask
        bound = block_kernel(
            q, k, causal=call.causal, has_mask=mask is not None, dropout_p=call.dropout_p,
            softmax_scale=self.softmax_scale, kernel=self.kernel, seed=call.seed,
        )  # fmt: skip
        branch_list = branches(self.segments, self.rates, self.merge, q.shape[2])
        return DilatedSchedule(bound, branch_list, causal=call.causal, key_padding_mask=mask)


_dilated_ops: dict[tuple, _DilatedOp] = {}


@torch.compiler.assume_constant_result
def _dilated_op(segments, rates, merge: str, softmax_scale: float | None, kernel: str | None) -> str:
    """The name of the op of one configuration (made once; a constant for ``torch.compile``)."""
    key = (segments, rates, merge, softmax_scale, kernel)
    op = _dilated_ops.get(key)
    if op is None:
        op = _dilated_ops.setdefault(key, _DilatedOp(*key))
    return op.name


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str = "lse",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    kernel: str | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention of ``(B, N, H, D)`` tensors, exactly as SPEC.md defines it.

    ``key_padding_mask`` is bool ``(B, N)``, True where a key is padding. With
    ``return_lse`` also returns the log-sum-exp ``(B, H, N)`` (see :mod:`ring_core.lse`).
    ``kernel`` forces a kernel backend by name (else ``RING_ATTENTION_KERNEL`` or
    the first that supports the request). One op for ``torch.compile`` (:mod:`ring_core.ops`).
    """
    segments, rates = check_dilated_config(segment_lengths, dilation_rates, merge)
    dropout_p = check_dropout(dropout_p)
    check_qkv(q, k, v, key_padding_mask)
    op = _dilated_op(segments, rates, merge, softmax_scale, kernel)
    out, lse = run_attention(
        op, q, k, v, key_padding_mask=key_padding_mask, causal=bool(is_causal), dropout_p=dropout_p,
        lse_grad=return_lse,
    )  # fmt: skip
    return (out, lse.transpose(1, 2)) if return_lse else out


class DilatedAttention(nn.Module):
    """LongNet dilated attention on one device; a thin wrapper of :func:`dilated_attention`.

    Forward: ``attn(q, k, v, *, is_causal=False, key_padding_mask=None, return_lse=False)``
    on ``(B, N, H, D)`` tensors; any ``N``, GQA, key padding, causal, both merges;
    ``return_lse=True`` returns ``(out, lse)`` (:mod:`ring_core.lse`).
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        merge: str = "lse",
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_dilated_config(segment_lengths, dilation_rates, merge)
        self.merge = merge
        self.softmax_scale = softmax_scale
        self.dropout = check_dropout(dropout)
        self.kernel = kernel

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """LongNet dilated attention of ``q`` over ``k``, ``v`` (SPEC.md); differentiable.

        Args:
            q: ``(B, N, H, D)`` queries, float64, float32, float16 or bfloat16 (the kernels say which
                they serve: ``ring-attention info``); any ``N``.
            k: ``(B, N, H_kv, D)`` keys, ``H % H_kv == 0`` (grouped-query attention); same dtype and
                device as ``q``.
            v: ``(B, N, H_kv, D_v)`` values.
            is_causal: query ``t`` sees only keys ``s <= t``.
            key_padding_mask: bool ``(B, N)``, ``True`` where a key is padding: no query sees it.
            return_lse: also return the log-sum-exp of each query row's scores, ``(B, H, N)``,
                float32 (float64 for float64 inputs).

        Returns:
            ``(B, N, H, D_v)`` in the dtype and on the device of ``q``; a query that sees no key gets 0.
            With ``return_lse``, the pair ``(out, lse)``.

        Raises:
            ValueError, TypeError: inputs that do not fit, named with the shape or dtype found.
        """
        return dilated_attention(
            q,
            k,
            v,
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            merge=self.merge,
            is_causal=is_causal,
            key_padding_mask=key_padding_mask,
            softmax_scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0,
            kernel=self.kernel,
            return_lse=return_lse,
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"merge={self.merge!r}, dropout={self.dropout}"
        )
