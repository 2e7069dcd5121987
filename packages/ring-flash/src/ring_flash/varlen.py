"""Packed documents on one device through a kernel's own varlen call: one call per branch offset.

With ``cu_seqlens``, the segments of a dilated branch offset are spread over many
documents, of many lengths; the generic engine computes them one document at a time.
A kernel that ``supports_varlen`` (flash-attn's layout: rows packed as ``(total, H, D)``,
int32 cumulative lengths) takes them all in one call: the selected rows of every
document, of the offset's heads only, are gathered in order (no copy at all for a rate-1
branch: its rows are the sequence itself, a strided view of its heads), the segments'
lengths become the call's cumulative lengths, and a window or causality (segments are
whole, so rows and keys coincide) goes to the kernel as is.

Like the fused segment path (:mod:`ring_flash.fused`), nothing is done around the
kernels that the result does not need:

- the calls (their rows, cumulative lengths, windows) depend only on the geometry and
  the documents, so they are made once and reused (no host work, no host-device copy or
  synchronisation on later calls, backward included);
- the call that covers every row and head (a rate-1 branch over all heads) runs first,
  and its output, log-sum-exp and gradients *are* the results (dense packed attention is
  the bare varlen call and nothing else); each other call is merged into the rows it
  covers in one pass (:func:`ring_flash.merge.online_merge` and
  :func:`~ring_flash.merge.merge_blocks`, Triton on CUDA, straight into the gathered rows
  through their index), computed in float32 and stored in the output dtype.

Backward calls the kernel's varlen backward with the final ``out`` and ``lse``. Only
without key padding and dropout (the varlen kernels take neither); exact like the engine.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import torch

from ring_core.plugin import Branch, KernelBackend, Part, accumulation_dtype, dilated_parts, index_window

from .merge import gather_rows, merge_blocks, online_merge


@dataclass(eq=False)
class _Call:
    """One varlen kernel call: rows ``rows`` (None: every row, in order) of heads ``heads``, in segments ``cu``."""

    rows: torch.Tensor | None
    heads: slice
    kv_heads: slice | torch.Tensor
    cu: torch.Tensor
    max_len: int
    causal: bool
    window: tuple[int, int] | None


def _whole(heads: slice | torch.Tensor, count: int) -> bool:
    """Whether ``heads`` are all ``count`` heads in order."""
    return isinstance(heads, slice) and range(*heads.indices(count)) == range(count)


# A few geometries: every layer of a model shares one, and backward reuses its forward's; the row indices are
# device memory (about N int64 per dilated branch), kept only for the last documents.
@functools.lru_cache(maxsize=8)
def _calls(
    branch_list: tuple[Branch, ...],
    seq_len: int,
    num_heads: int,
    groups: int,
    window: tuple[int, int],
    causal: bool,
    documents: tuple[int, ...],
    device: torch.device,
) -> tuple[_Call, ...]:
    """The calls of a geometry, those covering every row and head first (made once: the host builds every
    index, and copies it to the device, here only)."""
    by_offset: dict[tuple[object, ...], list[Part]] = {}
    for bi, branch in enumerate(branch_list):
        for part in dilated_parts(seq_len, branch, groups, device, documents):
            by_offset.setdefault((bi, part.heads.start), []).append(part)
    calls = []
    for parts in by_offset.values():
        rate, heads, kv_heads = parts[0].rate, parts[0].heads, parts[0].kv_heads
        lengths = [p.length for p in parts for _ in range((p.stop - p.start) // p.length)]
        cu = torch.tensor(list(itertools.accumulate(lengths, initial=0)), dtype=torch.int32).to(device)
        rows = None
        if rate > 1 or sum(lengths) != seq_len:
            positions = [torch.arange(p.offset + rate * p.start, p.offset + rate * p.stop, rate) for p in parts]
            rows = torch.cat(positions).to(device)
        if groups > 1 and rate == 1 and _whole(heads, num_heads):
            kv_heads = slice(None)  # every head: the kernel's own grouped-query attention
        left, right = index_window(window, rate, causal)
        is_causal = (left, right) == (-1, 0)
        kernel_window = None if (left, right) == (-1, -1) or is_causal else (left, right)
        calls.append(_Call(rows, heads, kv_heads, cu, max(lengths), is_causal, kernel_window))
    calls.sort(key=lambda call: not (call.rows is None and _whole(call.heads, num_heads)))
    return tuple(calls)


def _heads(x: torch.Tensor, heads: slice | torch.Tensor) -> torch.Tensor:
    """``x[:, heads]`` (a view for a slice)."""
    return x[:, heads] if isinstance(heads, slice) else x.index_select(1, heads)


def _gathered(call: _Call, *views: torch.Tensor) -> list[torch.Tensor]:
    """The call's rows of each ``(N, h, D)`` view, packed (the views themselves when it takes every row in order;
    alike views gathered in one pass)."""
    return list(views) if call.rows is None else gather_rows(views, call.rows)


class VarlenKernel(Protocol):
    """What a plan calls of its kernel: a backend that ``supports_varlen`` has these two (flash-attn's layout)."""

    def forward_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float,
        causal: bool = False,
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward_varlen(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float,
        causal: bool = False,
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def merge(
        self, out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor, lse_block: torch.Tensor
    ) -> None: ...


@dataclass
class VarlenPlan:
    """The kernel and its calls: one per branch offset, every document in it."""

    backend: VarlenKernel
    scale: float
    calls: Sequence[_Call]


def varlen_plan(
    backend: KernelBackend,
    scale: float,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    branch_list: Sequence[Branch],
    causal: bool,
    window_size: tuple[int, int],
    documents: Sequence[int],
) -> VarlenPlan:
    """The calls of packed dilated attention of a batch of one (inputs checked, no key padding or dropout)."""
    calls = _calls(
        tuple(branch_list), q.shape[1], q.shape[2], q.shape[2] // k.shape[2], tuple(window_size), bool(causal),
        tuple(documents), q.device,
    )  # fmt: skip
    # (the caller selected a backend for a varlen request: it supports_varlen)
    return VarlenPlan(cast(VarlenKernel, backend), scale, calls)


def _owns(
    block: torch.Tensor, call: _Call, heads: slice | torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
) -> bool:
    """Whether ``block`` can become the whole result (every row and head, same shape, layout and dtype)."""
    return (
        call.rows is None
        and _whole(heads, shape[1])
        and tuple(block.shape) == tuple(shape)
        and block.dtype == dtype
        and block.is_contiguous()
    )


def varlen_forward(
    plan: VarlenPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` ``(1, N, H, D)`` (dtype of ``q``) and ``lse`` ``(1, N, H)`` of the plan's calls, merged by LSE."""
    q0, k0, v0 = q[0], k[0], v[0]
    n, h = q0.shape[:2]
    acc = accumulation_dtype(q.dtype)
    shape = (n, h, v.shape[-1])
    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    for call in plan.calls:
        qb, kb, vb = _gathered(call, _heads(q0, call.heads), _heads(k0, call.kv_heads), _heads(v0, call.kv_heads))
        o, block_lse = plan.backend.forward_varlen(
            qb, kb, vb, call.cu, call.cu, call.max_len, call.max_len, scale=plan.scale, causal=call.causal,
            window=call.window,
        )  # fmt: skip
        del qb, kb, vb
        block_lse = block_lse.transpose(0, 1).to(acc)  # (total, h)
        if out is None and _owns(o, call, call.heads, shape, q.dtype):
            out, lse = o, block_lse  # the covering call (listed first): its output is the output
            continue
        if out is None or lse is None:  # (both None or neither)
            out = torch.zeros(shape, dtype=q.dtype, device=q.device)
            lse = torch.full((n, h), float("-inf"), dtype=acc, device=q.device)
        _merge(plan.backend, out[:, call.heads], lse[:, call.heads], o, block_lse, call.rows)
        del o, block_lse  # before the next call allocates its own
    assert out is not None and lse is not None  # (a plan has calls)
    return out.unsqueeze(0), lse.unsqueeze(0)


def _merge(
    backend: VarlenKernel,
    out: torch.Tensor,
    lse: torch.Tensor,
    o: torch.Tensor,
    block_lse: torch.Tensor,
    rows: torch.Tensor | None,
) -> None:
    """LSE merge of a call's ``o, block_lse`` into the views ``out, lse`` (at their ``rows``, when given)."""
    if rows is None:
        backend.merge(out, lse, o, block_lse)
    elif not online_merge(out, lse, o, block_lse, index=rows):  # no Triton: gather, merge, write back
        rows_out, rows_lse = out.index_select(0, rows), lse.index_select(0, rows)
        backend.merge(rows_out, rows_lse, o, block_lse)
        out.index_copy_(0, rows, rows_out)
        lse.index_copy_(0, rows, rows_lse)


def varlen_backward(
    plan: VarlenPlan,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (dtypes of ``q, k, v``) from :func:`varlen_forward`'s final ``out`` and ``lse``."""
    inputs = (q[0], k[0], v[0])
    dout0, out0, lse0 = dout[0], out[0].to(q.dtype), lse[0]
    grads: list[torch.Tensor | None] = [None, None, None]
    for call in plan.calls:
        doutb, qb, outb = _gathered(call, *(_heads(x, call.heads) for x in (dout0, inputs[0], out0)))
        kb, vb = _gathered(call, *(_heads(x, call.kv_heads) for x in inputs[1:]))
        lse_rows = lse0[:, call.heads] if call.rows is None else lse0[:, call.heads].index_select(0, call.rows)
        block = plan.backend.backward_varlen(
            doutb, qb, kb, vb, outb, lse_rows.transpose(0, 1), call.cu, call.cu, call.max_len, call.max_len,
            scale=plan.scale, causal=call.causal, window=call.window,
        )  # fmt: skip
        del doutb, qb, kb, vb, outb, lse_rows
        adds: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, (x, heads, block_grad) in enumerate(zip(inputs, (call.heads, call.kv_heads, call.kv_heads), block)):
            grad = grads[i]
            if grad is None and _owns(block_grad, call, heads, x.shape, x.dtype):
                grads[i] = block_grad  # the covering call (listed first): its gradient is the gradient
                continue
            if grad is None:
                grad = grads[i] = torch.zeros_like(x)
            if isinstance(heads, slice):
                adds.append((grad[:, heads], block_grad))
            else:  # key/value heads repeated for grouped queries: they add up
                _add_heads(grad, call.rows, heads, block_grad)
        if adds:
            merge_blocks([g for g, _ in adds], [b for _, b in adds], accumulate=True, index=call.rows)
        del block, adds  # before the next call allocates its own
    dq, dk, dv = grads
    assert dq is not None and dk is not None and dv is not None  # (the calls cover every row and head)
    return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)


def _add_heads(grad: torch.Tensor, rows: torch.Tensor | None, heads: torch.Tensor, block: torch.Tensor) -> None:
    """``grad[rows, heads] += block`` for an index of (repeated) heads."""
    rows = torch.arange(grad.shape[0], device=grad.device) if rows is None else rows
    grad.index_put_((rows[:, None], heads[None, :]), block.to(grad.dtype), accumulate=True)
