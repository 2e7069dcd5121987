"""Dilated attention (LongNet) on one device, as a schedule of the blockwise engine.

For branch ``(w, r)`` and offset ``o``, the selected positions ``o, o+r, o+2r, ...``
form a strided view of the sequence; because ``w % r == 0`` their segments are
consecutive runs of ``w // r`` selected positions. So a branch is: a strided
gather, one kernel call over all full segments as a batch (plus one for a shorter
last segment), and a merge back through the same strided view.

Packed documents (``cu_seqlens``) repeat this per document, from the document's
first position; a sliding window either goes to a kernel that takes it or cuts the
segments' queries into tiles that see only the keys their window reaches
(:mod:`ring_core.windows`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .dispatch import block_kernel
from .engine import Accumulator, BlockKernel, BlockSchedule
from .ops import AttentionOp, OpCall, run_attention
from .validation import (
    check_cu_seqlens,
    check_dilated_config,
    check_dropout,
    check_qkv,
    check_scale,
    check_window,
    varlen_layout,
)
from .windows import NO_WINDOW, document_spans, index_window, kernel_window, window_tiles

__all__ = [
    "Block",
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
    "part_blocks",
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


def branch_offsets(branch: Branch) -> list[int]:
    """The offsets ``o`` that some query head of ``branch`` uses (``h mod rate``), ascending: at most one per head,
    so the work stays bounded by the heads however large the rate."""
    return sorted({h % branch.rate for h in range(branch.head_start, branch.head_stop)})


@dataclass(frozen=True)
class Part:
    """Selected positions ``[start, stop)`` (in units of ``rate``) cut into segments of ``length``.

    ``rows`` (``None``: all) keeps only the rows ``[lo, hi)`` of every segment: a tile of a
    segment's queries, or the keys a window reaches.
    """

    offset: int
    rate: int
    start: int
    stop: int
    length: int
    heads: slice
    kv_heads: torch.Tensor | slice
    rows: tuple[int, int] | None = None

    def positions(self) -> slice:
        first = self.offset + self.rate * self.start
        return slice(first, self.offset + self.rate * (self.stop - 1) + 1, self.rate)

    @property
    def segment_rows(self) -> int:
        """Rows of each segment this part holds."""
        return self.length if self.rows is None else self.rows[1] - self.rows[0]

    def _cut(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, nseg, length, ...)`` -> the ``rows`` of every segment."""
        return y if self.rows is None else y[:, :, self.rows[0] : self.rows[1]]

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, nseg, rows, h, ...)`` strided view of ``x`` (``(B, N, H, ...)``)."""
        return self._cut(x[:, self.positions(), self.heads].unflatten(1, (-1, self.length)))

    def kv_view(self, x: torch.Tensor) -> torch.Tensor:
        """Like :meth:`view` with the key/value heads (a slice: no grouped-query heads)."""
        return self._cut(x[:, self.positions(), self.kv_heads].unflatten(1, (-1, self.length)))

    def gather_kv(self, x: torch.Tensor) -> torch.Tensor:
        y = x[:, self.positions()]
        y = y[:, :, self.kv_heads] if isinstance(self.kv_heads, slice) else y.index_select(2, self.kv_heads)
        return self._cut(y.unflatten(1, (-1, self.length))).flatten(0, 1)

    def add_kv_grad(
        self,
        grad: torch.Tensor,
        block_grad: torch.Tensor,
        accumulate: Callable[[torch.Tensor, torch.Tensor], object] = torch.Tensor.add_,
    ) -> None:
        """``grad[kv rows] += block_grad``; ``accumulate(view, block)`` adds (grouped-query heads: ``index_add_``)."""
        view = self._cut(grad[:, self.positions()].unflatten(1, (-1, self.length)))
        if isinstance(self.kv_heads, slice):
            accumulate(view[:, :, :, self.kv_heads], block_grad.unflatten(0, view.shape[:2]))
        else:  # kernels may return the input dtype; index_add_ needs one dtype
            view.index_add_(3, self.kv_heads, block_grad.to(grad.dtype).unflatten(0, view.shape[:2]))

    def key_mask(self, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Bool ``(B*nseg, 1, 1, rows)``, True where a key is allowed."""
        if key_padding_mask is None:
            return None
        kept = ~self._cut(key_padding_mask[:, self.positions()].unflatten(1, (-1, self.length)))
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


def dilated_parts(
    seq_len: int, branch: Branch, groups: int, device: torch.device, documents: Sequence[int] | None = None
) -> Iterator[Part]:
    """Every kernel call of one branch: per document and offset, the full segments and the shorter last one.

    ``groups`` is ``H // H_kv``: query head ``h`` reads key/value head ``h // groups``.
    ``documents`` (checked ``cu_seqlens`` values, or None: one document) restart the
    segments and offsets at every document.
    """
    r = branch.rate
    for offset in branch_offsets(branch):
        selected = offset_heads(branch, offset, groups, device, expand=True)
        if selected is None:
            continue
        heads, kv_heads = selected
        for doc_start, doc_stop in document_spans(documents, seq_len):
            count = len(range(offset, doc_stop - doc_start, r))
            if count == 0:
                continue
            length = min(branch.segment // r, count)
            full = count - count % length
            if full:
                yield Part(doc_start + offset, r, 0, full, length, heads, kv_heads)
            if full < count:
                yield Part(doc_start + offset, r, full, count, count - full, heads, kv_heads)


@dataclass(frozen=True)
class Block:
    """One kernel call: the rows ``q`` of every segment see the rows ``kv`` of the same segment.

    ``causal`` is the kernel's causal flag (square blocks); ``window`` the kernel window
    (:func:`ring_core.windows.kernel_window`) or None.
    """

    q: Part
    kv: Part
    causal: bool = False
    window: tuple[int, int] | None = None


def part_blocks(part: Part, window: tuple[int, int], *, native_window: bool) -> list[Block]:
    """The blocks of the segments of ``part`` under the index ``window`` (:func:`ring_core.windows.index_window`).

    No window: one block (causal flag for ``(-1, 0)``). A backend with ``native_window``:
    one block with the kernel window. Otherwise tiles of the queries, each with only
    the keys its window reaches (:func:`ring_core.windows.window_tiles`).
    """
    if window in (NO_WINDOW, (-1, 0)):
        return [Block(part, part, causal=window == (-1, 0))]
    segment = (0, part.length)
    if native_window:
        return [Block(part, part, window=kernel_window(segment, segment, window))]
    return [
        Block(replace(part, rows=rows), replace(part, rows=keys), window=kernel_window(rows, keys, window))
        for rows, keys in window_tiles(part.length, window)
    ]


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
    window: tuple[int, int] | None = None,
) -> None:
    """Merge one block into ``acc``: the query rows and heads of ``q_part`` against a key block.

    ``k_block``/``v_block`` are ``(B * nseg, m, h_kv, D)`` (what :meth:`Part.gather_kv`
    returns, here or on the rank that sent them) and ``mask`` is :meth:`Part.key_mask`'s
    (or None). ``block_id`` keeps dropout streams apart: unique per block of a call.
    ``window``: the block's kernel window (:mod:`ring_core.windows`), or None.
    """
    kernel.forward_into(
        q_part.view(acc.out), q_part.view(acc.lse), q_part.view(q).flatten(0, 1), k_block, v_block,
        causal=causal, mask=mask, window=window, block_id=block_id,
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
    window: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact gradient of one block (same arguments as :func:`forward_block`, with the final ``out``/``lse``).

    Adds the block's dq into ``dq``'s rows of ``q_part`` and returns its ``(dk, dv)`` in the
    key block's layout, for :meth:`Part.add_kv_grad` of the key part (here or on its owner).
    """
    block_dq, block_dk, block_dv = kernel.backward(
        q_part.view(dout).flatten(0, 1), q_part.view(q).flatten(0, 1), k_block, v_block,
        q_part.view(out).flatten(0, 1), q_part.view(lse).flatten(0, 1),
        causal=causal, mask=mask, window=window, block_id=block_id,
    )  # fmt: skip
    view = q_part.view(dq)
    kernel.accumulate(view, block_dq.unflatten(0, view.shape[:2]))
    return block_dk, block_dv


class DilatedSchedule(BlockSchedule):
    """LongNet dilated attention on one device: all branches, offsets, documents, segments and window tiles."""

    def __init__(
        self,
        kernel: BlockKernel,
        branch_list: Sequence[Branch],
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        window: tuple[int, int] = NO_WINDOW,
        documents: Sequence[int] | None = None,
    ) -> None:
        self.kernel = kernel
        self.branches = list(branch_list)
        self.causal = causal
        self.key_padding_mask = key_padding_mask
        self.window = window
        self.documents = documents

    def blocks(self, q: torch.Tensor, k: torch.Tensor) -> Iterator[Block]:
        """Every kernel call, in a fixed order."""
        native = self.kernel.backend.supports_window
        for branch in self.branches:
            window = index_window(self.window, branch.rate, self.causal)
            for part in dilated_parts(q.shape[1], branch, q.shape[2] // k.shape[2], q.device, self.documents):
                yield from part_blocks(part, window, native_window=native)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: Accumulator) -> None:
        """Merge each branch's blocks (its segments, gathered) into ``acc``; ``q, k, v``: ``(B, N, H, D)``."""
        for block_id, block in enumerate(self.blocks(q, k)):
            kv = (block.kv.gather_kv(k), block.kv.gather_kv(v), block.kv.key_mask(self.key_padding_mask))
            forward_block(
                self.kernel, block.q, q, *kv, acc, causal=block.causal, block_id=block_id, window=block.window
            )

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
        dq, dk, dv = grads
        for block_id, block in enumerate(self.blocks(q, k)):
            kv = (block.kv.gather_kv(k), block.kv.gather_kv(v), block.kv.key_mask(self.key_padding_mask))
            block_dk, block_dv = backward_block(
                self.kernel, block.q, q, *kv, out, lse, dout, dq, causal=block.causal, block_id=block_id,
                window=block.window,
            )  # fmt: skip
            block.kv.add_kv_grad(dk, block_dk, self.kernel.accumulate)
            block.kv.add_kv_grad(dv, block_dv, self.kernel.accumulate)


class _DilatedOp(AttentionOp):
    """The custom ops' side of :func:`dilated_attention` for one configuration."""

    def __init__(
        self,
        segments: tuple[int, ...],
        rates: tuple[int, ...],
        merge: str,
        softmax_scale: float | None,
        kernel: str | None,
        window: tuple[int, int] = NO_WINDOW,
    ) -> None:
        super().__init__()
        self.segments, self.rates, self.merge = segments, rates, merge
        self.softmax_scale, self.kernel, self.window = softmax_scale, kernel, window

    def schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> DilatedSchedule:
        mask = call.key_padding_mask
        bound = block_kernel(
            q, k, causal=call.causal, has_mask=mask is not None, dropout_p=call.dropout_p,
            softmax_scale=self.softmax_scale, kernel=self.kernel, seed=call.seed, window=self.window != NO_WINDOW,
        )  # fmt: skip
        branch_list = branches(self.segments, self.rates, self.merge, q.shape[2])
        return DilatedSchedule(
            bound, branch_list, causal=call.causal, key_padding_mask=mask, window=self.window,
            documents=call.documents,
        )  # fmt: skip


_dilated_ops: dict[tuple[object, ...], _DilatedOp] = {}


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _dilated_op(
    segments: tuple[int, ...],
    rates: tuple[int, ...],
    merge: str,
    softmax_scale: float | None,
    kernel: str | None,
    window: tuple[int, int] = NO_WINDOW,
) -> str:
    """The name of the op of one configuration (made once; a constant for ``torch.compile``)."""
    key = (segments, rates, merge, softmax_scale, kernel, window)
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
    window_size: tuple[int, int] = NO_WINDOW,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LongNet dilated attention of ``(B, N, H, D)`` tensors, exactly as SPEC.md defines it.

    ``key_padding_mask`` is bool ``(B, N)``, True where a key is padding. With
    ``return_lse`` also returns the log-sum-exp ``(B, H, N)`` (see :mod:`ring_core.lse`).
    ``kernel`` forces a kernel backend by name (else ``RING_ATTENTION_KERNEL`` or
    the first that supports the request). One op for ``torch.compile`` (:mod:`ring_core.ops`).

    ``window_size=(left, right)``: query ``t`` sees only keys ``t - left <= s <= t + right``
    (``-1``: unbounded). ``cu_seqlens``: a 1-D integer tensor ``[0, ..., N]`` of document
    boundaries (``B = 1``); segments, offsets, windows and causality restart at every
    document and no query sees another document. With ``cu_seqlens``, flash-attn's
    varlen layout ``(total, H, D)`` is accepted too (then the output is ``(total, H, D)``
    and the log-sum-exp ``(H, total)``).
    """
    (q, k, v, key_padding_mask), unbatched = varlen_layout(cu_seqlens, q, k, v, key_padding_mask)
    segments, rates = check_dilated_config(segment_lengths, dilation_rates, merge)
    dropout_p = check_dropout(dropout_p)
    softmax_scale = check_scale(softmax_scale)
    check_qkv(q, k, v, key_padding_mask)
    window = check_window(window_size)
    documents = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    op = _dilated_op(segments, rates, merge, softmax_scale, kernel, window)
    out, lse = run_attention(
        op, q, k, v, key_padding_mask=key_padding_mask, causal=bool(is_causal), dropout_p=dropout_p,
        lse_grad=return_lse, cu_seqlens=cu_seqlens, documents=documents,
    )  # fmt: skip
    if unbatched:
        out, lse = out[0], lse[0]
    return (out, lse.transpose(-2, -1)) if return_lse else out


class DilatedAttention(nn.Module):
    """LongNet dilated attention on one device; a thin wrapper of :func:`dilated_attention`.

    Forward: ``attn(q, k, v, *, is_causal=False, key_padding_mask=None, return_lse=False,
    cu_seqlens=None)`` on ``(B, N, H, D)`` tensors; any ``N``, GQA, key padding, causal, both
    merges, sliding windows (``window_size``) and packed documents (``cu_seqlens``, ``B = 1``);
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
        window_size: tuple[int, int] = NO_WINDOW,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_dilated_config(segment_lengths, dilation_rates, merge)
        self.window_size = check_window(window_size)
        self.merge = merge
        self.softmax_scale = check_scale(softmax_scale)
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
        cu_seqlens: torch.Tensor | None = None,
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
            cu_seqlens: 1-D integer tensor ``[0, ..., N]`` of document boundaries (``B = 1``): segments,
                offsets, windows and causality restart at every document and no query sees another
                document (SPEC.md, "Packed sequences").

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
            window_size=self.window_size,
            cu_seqlens=cu_seqlens,
        )

    def extra_repr(self) -> str:
        window = f", window_size={self.window_size}" if self.window_size != NO_WINDOW else ""
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"merge={self.merge!r}, dropout={self.dropout}{window}"
        )
