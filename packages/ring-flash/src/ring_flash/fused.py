"""Dilated attention on one device with fewer passes over memory than the generic engine.

The same blocks as :class:`ring_core.DilatedSchedule` (one kernel call per branch
offset over all its segments, strided views, no gather for ``q``), but:

- forward starts from the block that covers every row (rate 1, all heads): its
  output *is* the output (dense attention is one kernel call and nothing else),
  and each other block is merged into the rows it covers with one online LSE
  merge pass (rescale what is there, add the block, update the log-sum-exp),
  computed in float32 and stored in the output dtype, so rows that only the
  covering block sees are never touched again, no float32 copy of the whole
  output exists, and each block is freed once merged;
- backward writes each kernel's ``dq, dk, dv`` straight into the gradients (the
  covering block takes ownership of its tensors, others add into strided views);
- every write into a strided view is one pass (:func:`ring_flash.merge.merge_block`,
  a Triton kernel on CUDA; a call's ``dq, dk, dv`` in one launch). Everything stays
  on one stream: the kernels fill the GPU, so the backward's adds gain nothing from a
  second stream beside the next kernel call;
- blocks larger than :data:`MAX_ROWS` query rows are cut into chunks of segments,
  so peak memory stays a fixed multiple of the inputs at any length.

Exact like the engine: float64 inputs give float64 results to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ring_core.plugin import (
    Block,
    Branch,
    KernelBackend,
    Part,
    branches,
    dilated_parts,
    index_window,
    part_blocks,
    window_kwargs,
)

from .merge import merge_block, merge_blocks

# Query rows (positions x heads x batch) per kernel call; bigger blocks are cut by segments.
# 2**20 rows of D=128 in bf16 are 256 MiB per tensor: chunk temporaries stay small at 4M tokens.
MAX_ROWS = 1 << 20


@dataclass
class FusedPlan:
    """Everything the autograd function needs besides the tensors."""

    backend: KernelBackend
    scale: float
    branches: Sequence[Branch]
    causal: bool
    key_padding_mask: torch.Tensor | None
    accumulate_fp32: bool = False
    max_rows: int = MAX_ROWS
    window: tuple[int, int] = (-1, -1)
    documents: Sequence[int] | None = None


def _heads(part: Part, num_heads: int) -> int:
    return len(range(*part.heads.indices(num_heads)))


def _chunks(part: Part, batch: int, num_heads: int, max_rows: int) -> Iterator[Part]:
    """``part`` cut into pieces of whole segments with at most ``max_rows`` query rows each."""
    rows_per_segment = part.length * _heads(part, num_heads) * batch
    step = max(1, max_rows // max(1, rows_per_segment)) * part.length
    if part.stop - part.start <= step:
        yield part
        return
    for start in range(part.start, part.stop, step):
        yield replace(part, start=start, stop=min(part.stop, start + step))


def _plan_parts(plan: FusedPlan, q: torch.Tensor, k: torch.Tensor) -> list[tuple[Block, bool]]:
    """Every kernel call as ``(block, writes)``: ``writes`` marks the covering branch, listed first.

    Each query row of the covering branch is in exactly one of its blocks (documents and
    window tiles split rows, never repeat them)."""
    b, n, h = q.shape[:3]
    groups = h // k.shape[2]
    native = plan.backend.supports_window
    covering = next(
        (i for i, br in enumerate(plan.branches) if br.rate == 1 and br.head_stop - br.head_start == h), None
    )
    calls = []
    for index, branch in enumerate(plan.branches):
        window = index_window(plan.window, branch.rate, plan.causal)
        for part in dilated_parts(n, branch, groups, q.device, plan.documents):
            for chunk in _chunks(part, b, h, plan.max_rows):
                calls += [(block, index == covering) for block in part_blocks(chunk, window, native_window=native)]
    calls.sort(key=lambda call: not call[1])
    return calls


def _owns(part: Part, shape: tuple[int, ...], dtype: torch.dtype, block: torch.Tensor, writes: int) -> bool:
    """Whether ``block`` can become the whole result: the only write, spanning it, same layout and dtype."""
    return (
        writes == 1
        and part.offset == 0
        and part.rows is None
        and part.start == 0
        and part.stop == shape[1]
        and block.is_contiguous()
        and block.numel() == math.prod(shape)
        and block.dtype == dtype
    )


def fused_forward(
    plan: FusedPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` (dtype of ``q``) and ``lse`` ``(B, N, H)`` (float32, float64 for float64 inputs) of ``plan``."""
    b, n, h, _ = q.shape
    dv_ = v.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = acc if plan.accumulate_fp32 else q.dtype
    calls = _plan_parts(plan, q, k)
    writes = sum(1 for _, write in calls if write)
    weighted = len(calls) > 1 and _overlap(plan.branches)
    lse = torch.full((b, n, h), float("-inf"), dtype=acc, device=q.device)
    out: torch.Tensor | None = None
    for block, write in calls:  # the covering calls first: they write; later blocks merge into what is there
        part = block.q
        qb, kb = part.view(q).flatten(0, 1), block.kv.gather_kv(k)
        o, block_lse = plan.backend.forward(
            qb, kb, block.kv.gather_kv(v), scale=plan.scale, causal=block.causal,
            **window_kwargs(plan.backend, qb, kb, block.kv.key_mask(plan.key_padding_mask), block.window),
        )  # fmt: skip
        lse_view = part.view(lse)
        block_lse = block_lse.to(acc).unflatten(0, lse_view.shape[:2]).transpose(-1, -2)  # (B, nseg, len, h)
        o = o.reshape(*lse_view.shape, dv_)
        if out is None and write and _owns(part, (b, n, h, dv_), out_dtype, o, writes):
            out = o.view(b, n, h, dv_)  # the one covering call's output is where the others merge
            lse_view.copy_(block_lse)
            continue
        if out is None:
            out = (torch.empty if writes else torch.zeros)(b, n, h, dv_, dtype=out_dtype, device=q.device)
        if write or not weighted:  # first (or only) block of these rows and heads
            merge_block(part.view(out), o, accumulate=not write)
            lse_view.copy_(block_lse)
        else:  # the backend's merge: one Triton pass on GPUs
            plan.backend.merge(part.view(out), lse_view, o, block_lse)
        del o, block_lse  # before the next call allocates its own
    assert out is not None  # (a plan has blocks)
    return out.to(q.dtype), lse


def fused_backward(
    plan: FusedPlan,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` (dtypes of ``q, k, v``) from :func:`fused_forward`'s final ``out`` and ``lse``."""
    out = out.to(q.dtype)
    dout = dout.contiguous()
    calls = _plan_parts(plan, q, k)
    writes = sum(1 for _, write in calls if write)
    # the covering blocks write the key/value gradients only when their keys are their queries, every one of them
    # (window tiles read keys beyond their rows: then no block writes, all add into zeros)
    kv_writes = q.shape[2] == k.shape[2] and all(block.kv == block.q for block, write in calls if write)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_dtype = acc if plan.accumulate_fp32 else q.dtype
    dq: torch.Tensor | None = None
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None
    for block, write in calls:
        part, kv_part = block.q, block.kv
        qb, kb = part.view(q).flatten(0, 1), kv_part.gather_kv(k)
        bq, bk, bv = plan.backend.backward(
            part.view(dout).flatten(0, 1), qb, kb, kv_part.gather_kv(v), part.view(out).flatten(0, 1),
            part.view(lse).flatten(0, 1).transpose(1, 2), scale=plan.scale, causal=block.causal,
            **window_kwargs(plan.backend, qb, kb, kv_part.key_mask(plan.key_padding_mask), block.window),
        )  # fmt: skip
        kv_write = write and kv_writes
        dq, owned_q = _gradient(dq, q.shape, part, bq, write, writes, grad_dtype)
        dk, owned_k = _gradient(dk, k.shape, kv_part, bk, kv_write, writes, grad_dtype)
        dv, owned_v = _gradient(dv, v.shape, kv_part, bv, kv_write, writes, grad_dtype)
        merges = [(part.view(dq), bq, write)] if not owned_q else []
        for grad, block_grad, owned in ((dk, bk, owned_k), (dv, bv, owned_v)):
            if owned:
                continue
            if isinstance(kv_part.kv_heads, slice):  # no grouped-query heads: kv heads are the query heads
                merges.append((kv_part.kv_view(grad), block_grad, kv_write))
            else:  # grouped-query heads: several query heads add into one kv head
                kv_part.add_kv_grad(grad, block_grad)
        _write_or_add(merges)
        del bq, bk, bv, merges  # before the next call allocates its own
    assert dq is not None and dk is not None and dv is not None  # (a plan has blocks)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FusedDilated(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, plan: FusedPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = fused_forward(plan, q, k, v)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        return None, *fused_backward(ctx.plan, dout, q, k, v, out, lse)


def _overlap(branch_list: Sequence[Branch]) -> bool:
    """Whether some (position, head) is covered by two branches (so blocks need LSE weights)."""
    return any(
        a.head_start < b.head_stop and b.head_start < a.head_stop
        for i, a in enumerate(branch_list)
        for b in branch_list[i + 1 :]
    )


def _gradient(
    grad: torch.Tensor | None,
    shape: tuple[int, ...],
    part: Part,
    block: torch.Tensor,
    write: bool,
    writes: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, bool]:
    """The gradient buffer (created on first use) and whether ``block`` became it (nothing left to add)."""
    if grad is not None:
        return grad, False
    if write and _owns(part, shape, dtype, block, writes):
        return block.view(shape), True
    return (torch.empty if write else torch.zeros)(shape, dtype=dtype, device=block.device), False


def _write_or_add(merges: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
    """Each ``(view, block, write)``: copy (``write``) or add the kernel's block into the view; alike ones at once."""
    for write in (True, False):
        pairs = [(view, block.unflatten(0, view.shape[:2])) for view, block, w in merges if w == write]
        if pairs:
            merge_blocks([view for view, _ in pairs], [block for _, block in pairs], accumulate=not write)


def fused_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: KernelBackend,
    scale: float,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str = "lse",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    accumulate_fp32: bool = False,
    max_rows: int = MAX_ROWS,
    window_size: tuple[int, int] = (-1, -1),
    documents: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention through ``backend``; returns ``out`` (B, N, H, D) and ``lse`` (B, N, H).

    Inputs are assumed validated (see :func:`ring_core.dilated.dilated_attention`);
    ``documents`` are checked ``cu_seqlens`` values.
    """
    plan = FusedPlan(
        backend, scale, branches(segment_lengths, dilation_rates, merge, q.shape[2]), is_causal,
        key_padding_mask, accumulate_fp32, max_rows, (*window_size,), documents,
    )  # fmt: skip
    result: tuple[torch.Tensor, torch.Tensor] = _FusedDilated.apply(plan, q, k, v)  # type: ignore[no-untyped-call]
    return result
