"""Dilated attention on one device with fewer passes over memory than the generic engine.

The same blocks as :class:`ring_core.DilatedSchedule` (one kernel call per branch
offset over all its segments, strided views, no gather for ``q``), but:

- forward runs every kernel first, then merges each block once with its final
  weight ``exp(lse_block - lse)``; the output is accumulated in the output dtype
  (each weighted add is computed in float32) instead of a float32 copy of the
  whole output, and the block that covers every row (rate 1, all heads) is
  written in place of the output, so dense attention is one kernel call and
  nothing else;
- backward writes each kernel's ``dq, dk, dv`` straight into the gradients (the
  covering block takes ownership of its tensors, others add into strided views);
- blocks larger than :data:`MAX_ROWS` query rows are cut into chunks of segments,
  so peak memory stays a fixed multiple of the inputs at any length.

Exact like the engine: float64 inputs give float64 results to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from ring_core.dilated import Branch, Part, branches, dilated_parts
from ring_core.kernels import KernelBackend

# Query rows (positions x heads x batch) per kernel call; bigger blocks are cut by segments.
MAX_ROWS = 1 << 22


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
    fold: bool = False  # all offsets of a branch in one call (B == 1, no GQA): gathers q, k, v


@dataclass(frozen=True)
class FoldedPart:
    """Every offset of one branch in one kernel call (batch of 1, heads split evenly by the rate).

    Offset ``o`` pairs positions ``o, o+r, ...`` with heads ``o, o+r, ...`` of ``[head_start,
    head_stop)``: the diagonal of ``x`` viewed as ``(N/r, r, h/r, r)``. Views have the
    leading dims ``(r, nseg)`` where :class:`Part` has ``(B, nseg)``; feeding a kernel
    gathers the strided rows into one contiguous batch (one copy).
    """

    rate: int
    start: int
    stop: int
    length: int
    head_start: int
    head_stop: int

    @property
    def heads(self) -> slice:
        return slice(self.head_start, self.head_stop, self.rate)

    def _diagonal(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rate
        y = x[0, :, self.head_start : self.head_stop].unflatten(0, (-1, r)).unflatten(2, (-1, r))
        return y.diagonal(dim1=1, dim2=3).movedim(-1, 0)[:, self.start : self.stop]  # (r, n/r, h/r, ...)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """``(r, nseg, length, h/r, ...)`` strided view of ``x`` (``(1, N, H, ...)``)."""
        return self._diagonal(x).unflatten(1, (-1, self.length))

    def gather_kv(self, x: torch.Tensor) -> torch.Tensor:
        return self.view(x).flatten(0, 1)

    def add_kv_grad(self, grad: torch.Tensor, block_grad: torch.Tensor) -> None:
        view = self.view(grad)
        view += block_grad.unflatten(0, view.shape[:2])

    def key_mask(self, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        if key_padding_mask is None:
            return None
        kept = ~key_padding_mask[0].unflatten(0, (-1, self.rate)).t()[:, self.start : self.stop]
        return kept.unflatten(1, (-1, self.length)).flatten(0, 1)[:, None, None, :]


def folded_parts(seq_len: int, num_heads: int, branch: Branch) -> list[FoldedPart] | None:
    """The branch as :class:`FoldedPart` calls (full segments, shorter last), or ``None`` when it cannot fold."""
    r = branch.rate
    if r == 1 or seq_len % r or branch.head_start % r or (branch.head_stop - branch.head_start) % r:
        return None
    count = seq_len // r
    length = min(branch.segment // r, count)
    full = count - count % length
    parts = [FoldedPart(r, 0, full, length, branch.head_start, branch.head_stop)] if full else []
    if full < count:
        parts.append(FoldedPart(r, full, count, count - full, branch.head_start, branch.head_stop))
    return parts


def _heads(part: Part, num_heads: int) -> int:
    return len(range(*part.heads.indices(num_heads)))


def _chunks(part: Part | FoldedPart, batch: int, num_heads: int, max_rows: int) -> Iterator[Part | FoldedPart]:
    """``part`` cut into pieces of whole segments with at most ``max_rows`` query rows each."""
    rows_per_segment = part.length * _heads(part, num_heads) * batch
    if isinstance(part, FoldedPart):
        rows_per_segment *= part.rate
    step = max(1, max_rows // max(1, rows_per_segment)) * part.length
    if part.stop - part.start <= step:
        yield part
        return
    for start in range(part.start, part.stop, step):
        yield replace(part, start=start, stop=min(part.stop, start + step))


def _plan_parts(plan: FusedPlan, q: torch.Tensor, k: torch.Tensor) -> list[tuple[Part, bool]]:
    """Every kernel call as ``(part, writes)``: ``writes`` marks the covering branch, listed first."""
    b, n, h = q.shape[:3]
    groups = h // k.shape[2]
    covering = next(
        (i for i, br in enumerate(plan.branches) if br.rate == 1 and br.head_stop - br.head_start == h), None
    )
    calls = []
    for index, branch in enumerate(plan.branches):
        folded = folded_parts(n, h, branch) if plan.fold and b == 1 and groups == 1 else None
        for part in folded or dilated_parts(n, branch, groups, q.device):
            for chunk in _chunks(part, b, h, plan.max_rows):
                calls.append((chunk, index == covering))
    calls.sort(key=lambda call: not call[1])
    return calls


def _owns(part: Part, shape: tuple[int, ...], dtype: torch.dtype, block: torch.Tensor, writes: int) -> bool:
    """Whether ``block`` can become the whole result: the only write, spanning it, same layout and dtype."""
    return (
        writes == 1
        and part.start == 0
        and part.stop == shape[1]
        and block.is_contiguous()
        and block.numel() == math.prod(shape)
        and block.dtype == dtype
    )


class _FusedDilated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: FusedPlan, q, k, v):  # type: ignore[override]
        b, n, h, _ = q.shape
        dv_ = v.shape[-1]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out_dtype = acc if plan.accumulate_fp32 else q.dtype
        calls = _plan_parts(plan, q, k)
        writes = sum(1 for _, write in calls if write)
        lse = torch.full((b, n, h), float("-inf"), dtype=acc, device=q.device)
        blocks = []
        for part, write in calls:  # every kernel first: the final lse gives each block its weight
            o, block_lse = plan.backend.forward(
                part.view(q).flatten(0, 1), part.gather_kv(k), part.gather_kv(v), scale=plan.scale,
                causal=plan.causal, mask=part.key_mask(plan.key_padding_mask),
            )  # fmt: skip
            lse_view = part.view(lse)
            block_lse = block_lse.transpose(1, 2).reshape(lse_view.shape).to(acc)
            lse_view.copy_(block_lse if write else torch.logaddexp(lse_view, block_lse))
            blocks.append((o, block_lse))
        weighted = len(calls) > 1 and _overlap(plan.branches)
        out = None
        blocks.reverse()
        for part, write in calls:
            o, block_lse = blocks.pop()  # dropped once merged
            lse_view = part.view(lse)
            o = o.reshape(*lse_view.shape, dv_)
            weight = _weight(block_lse, lse_view) if weighted else None
            if out is None:
                if write and _owns(part, (b, n, h, dv_), out_dtype, o, writes):
                    out = o.view(b, n, h, dv_)
                    if weight is not None:
                        out.mul_(weight.reshape(b, n, h, 1))
                    continue
                out = (torch.empty if writes else torch.zeros)(b, n, h, dv_, dtype=out_dtype, device=q.device)
            view = part.view(out)
            if write:
                view.copy_(o if weight is None else o * weight)
            elif weight is None:
                view.add_(o)
            else:
                view.addcmul_(o, weight)
        del blocks
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):  # type: ignore[override]
        plan: FusedPlan = ctx.plan
        q, k, v, out, lse = ctx.saved_tensors
        out = out.to(q.dtype)
        dout = dout.contiguous()
        calls = _plan_parts(plan, q, k)
        writes = sum(1 for _, write in calls if write)
        groups = q.shape[2] // k.shape[2]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        grad_dtype = acc if plan.accumulate_fp32 else q.dtype
        dq = dk = dv = None
        for part, write in calls:
            bq, bk, bv = plan.backend.backward(
                part.view(dout).flatten(0, 1), part.view(q).flatten(0, 1), part.gather_kv(k), part.gather_kv(v),
                part.view(out).flatten(0, 1), part.view(lse).flatten(0, 1).transpose(1, 2), scale=plan.scale,
                causal=plan.causal, mask=part.key_mask(plan.key_padding_mask),
            )  # fmt: skip
            dq = _accumulate(dq, q.shape, part, bq, write, writes, grad_dtype)
            dk = _accumulate(dk, k.shape, part, bk, write and groups == 1, writes, grad_dtype, kv=True)
            dv = _accumulate(dv, v.shape, part, bv, write and groups == 1, writes, grad_dtype, kv=True)
            del bq, bk, bv  # before the next call allocates its own
        return None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _overlap(branch_list: Sequence[Branch]) -> bool:
    """Whether some (position, head) is covered by two branches (so blocks need LSE weights)."""
    return any(
        a.head_start < b.head_stop and b.head_start < a.head_stop
        for i, a in enumerate(branch_list)
        for b in branch_list[i + 1 :]
    )


def _weight(block_lse: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``exp(lse_block - lse)`` with a trailing unit dim (0 where nothing is seen at all)."""
    safe = total.masked_fill(torch.isinf(total), 0.0)
    return torch.exp(block_lse - safe).unsqueeze(-1)


def _accumulate(grad, shape, part, block, write, writes, dtype, *, kv=False):
    """Put one block's gradient into ``grad`` (created on first use); ``write`` blocks copy or take ownership."""
    if grad is None:
        if write and _owns(part, shape, dtype, block, writes):
            return block.view(shape)
        grad = (torch.empty if write else torch.zeros)(shape, dtype=dtype, device=block.device)
    if kv and not write:
        part.add_kv_grad(grad, block)
        return grad
    view = part.view(grad)  # with write and kv there is no GQA: kv heads are the query heads
    block = block.unflatten(0, view.shape[:2])
    if write:
        view.copy_(block)
    else:
        view.add_(block)
    return grad


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
    fold: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention through ``backend``; returns ``out`` (B, N, H, D) and ``lse`` (B, N, H).

    Inputs are assumed validated (see :func:`ring_core.dilated.dilated_attention`).
    """
    plan = FusedPlan(
        backend, scale, branches(segment_lengths, dilation_rates, merge, q.shape[2]), is_causal,
        key_padding_mask, accumulate_fp32, max_rows, fold,
    )  # fmt: skip
    return _FusedDilated.apply(plan, q, k, v)
