"""Packed documents on one device through a kernel's own varlen call: one call per branch offset.

With ``cu_seqlens``, the segments of a dilated branch offset are spread over many
documents, of many lengths; the generic engine computes them one document at a time.
A kernel that ``supports_varlen`` (flash-attn's layout: rows packed as ``(total, H, D)``,
int32 cumulative lengths) takes them all in one call: the selected rows of every
document are gathered in order (no copy at all for a rate-1 branch over every head: its
rows are the sequence itself), the segments' lengths become the call's cumulative
lengths, and a window or causality (segments are whole, so rows and keys coincide) goes
to the kernel as is. Calls are merged by LSE as in the engine; backward calls the
kernel's varlen backward with the final ``out`` and ``lse``.

Only without key padding and dropout (the varlen kernels take neither); exact like the
engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ring_core.plugin import Branch, KernelBackend, Part, dilated_parts, index_window, merge_into


@dataclass
class _Call:
    """One varlen kernel call: rows ``index`` (None: every row, in order) of heads ``heads``, in segments ``cu``."""

    index: torch.Tensor | None
    heads: slice
    kv_heads: slice | torch.Tensor
    cu: torch.Tensor
    max_len: int
    causal: bool
    window: tuple[int, int] | None


def _calls(
    branch_list: Sequence[Branch], seq_len: int, num_heads: int, groups: int, window, causal, documents, device
) -> list[_Call]:
    by_offset: dict[tuple, list[Part]] = {}
    for bi, branch in enumerate(branch_list):
        for part in dilated_parts(seq_len, branch, groups, device, documents):
            by_offset.setdefault((bi, part.heads.start), []).append(part)
    calls = []
    for parts in by_offset.values():
        rate, heads, kv_heads = parts[0].rate, parts[0].heads, parts[0].kv_heads
        lengths = [p.length for p in parts for _ in range((p.stop - p.start) // p.length)]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        index = None
        if rate > 1 or int(cu[-1]) != seq_len:
            index = torch.cat([torch.arange(p.offset + rate * p.start, p.offset + rate * p.stop, rate) for p in parts])
            index = index.to(device)
        if groups > 1 and rate == 1 and heads == slice(0, num_heads, 1):
            kv_heads = slice(None)  # every head: the kernel's own grouped-query attention
        left, right = index_window(window, rate, causal)
        is_causal = (left, right) == (-1, 0)
        kernel_window = None if (left, right) == (-1, -1) or is_causal else (left, right)
        calls.append(_Call(index, heads, kv_heads, cu, max(lengths), is_causal, kernel_window))
    return calls


def _rows(x: torch.Tensor, call: _Call, heads) -> torch.Tensor:
    """``(total, h, D)`` rows of ``x`` (``(N, H, D)``) for ``heads`` (a slice or index tensor)."""
    y = x if call.index is None else x.index_select(0, call.index)
    return y[:, heads] if isinstance(heads, slice) else y.index_select(1, heads)


def _add_rows(grad: torch.Tensor, call: _Call, heads, block: torch.Tensor) -> None:
    """``grad[rows, heads] += block`` (repeated heads of grouped queries accumulate)."""
    block = block.to(grad.dtype)
    if isinstance(heads, slice):
        view = grad[:, heads]
        view.add_(block) if call.index is None else view.index_add_(0, call.index, block)
        return
    rows = torch.arange(grad.shape[0], device=grad.device) if call.index is None else call.index
    grad.index_put_((rows[:, None], heads[None, :]), block, accumulate=True)


@dataclass
class VarlenPlan:
    """The kernel and its calls: one per branch offset, every document in it."""

    backend: KernelBackend
    scale: float
    calls: list[_Call]


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
        branch_list, q.shape[1], q.shape[2], q.shape[2] // k.shape[2], window_size, causal, documents, q.device
    )
    return VarlenPlan(backend, scale, calls)


def varlen_forward(plan: VarlenPlan, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` ``(1, N, H, D)`` (dtype of ``q``) and ``lse`` ``(1, N, H)`` of the plan's calls, merged by LSE."""
    q0, k0, v0 = q[0], k[0], v[0]
    n, h = q0.shape[:2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = lse = None
    for call in plan.calls:
        o, block_lse = plan.backend.forward_varlen(
            _rows(q0, call, call.heads), _rows(k0, call, call.kv_heads), _rows(v0, call, call.kv_heads),
            call.cu, call.cu, call.max_len, call.max_len, scale=plan.scale, causal=call.causal, window=call.window,
        )  # fmt: skip
        block_lse = block_lse.transpose(0, 1).to(acc)  # (total, h)
        if len(plan.calls) == 1 and call.index is None and call.heads == slice(0, h, 1):
            out, lse = o, block_lse  # the only call covers everything: its output is the output
            break
        if out is None:
            out = torch.zeros(n, h, v.shape[-1], dtype=acc, device=q.device)
            lse = torch.full((n, h), float("-inf"), dtype=acc, device=q.device)
        rows_out, rows_lse = _rows(out, call, call.heads), _rows(lse[..., None], call, call.heads)[..., 0]
        merge_into(rows_out, rows_lse, o, block_lse)
        _write_rows(out, call, rows_out)
        _write_rows(lse, call, rows_lse)
    return out.to(q.dtype).unsqueeze(0), lse.unsqueeze(0)


def varlen_backward(plan: VarlenPlan, dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (dtypes of ``q, k, v``) from :func:`varlen_forward`'s final ``out`` and ``lse``."""
    q0, k0, v0, dout0, out0, lse0 = q[0], k[0], v[0], dout[0].contiguous(), out[0].to(q.dtype), lse[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grads = [torch.zeros(x.shape, dtype=acc, device=x.device) for x in (q0, k0, v0)]
    for call in plan.calls:
        block = plan.backend.backward_varlen(
            _rows(dout0, call, call.heads), _rows(q0, call, call.heads), _rows(k0, call, call.kv_heads),
            _rows(v0, call, call.kv_heads), _rows(out0, call, call.heads),
            _rows(lse0[..., None], call, call.heads)[..., 0].transpose(0, 1), call.cu, call.cu, call.max_len,
            call.max_len, scale=plan.scale, causal=call.causal, window=call.window,
        )  # fmt: skip
        for grad, heads, block_grad in zip(grads, (call.heads, call.kv_heads, call.kv_heads), block, strict=True):
            _add_rows(grad, call, heads, block_grad)
    return tuple(g.to(x.dtype).unsqueeze(0) for g, x in zip(grads, (q, k, v), strict=True))


def _write_rows(x: torch.Tensor, call: _Call, rows: torch.Tensor) -> None:
    """``x[rows, heads] = rows`` for a call's rows and heads (a slice)."""
    view = x[:, call.heads]
    view.copy_(rows) if call.index is None else view.index_copy_(0, call.index, rows)
