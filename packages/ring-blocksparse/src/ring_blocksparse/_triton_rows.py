"""The Triton kernel of :mod:`ring_blocksparse.rows`: one program per (batch, packed row, block of heads)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def copy_rows_kernel(
    dst, src, index, count, heads, width, d_b, d_n, d_h, s_b, s_n, s_h,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, SCATTER: tl.constexpr, ADD: tl.constexpr,
):  # fmt: skip
    """``SCATTER``: ``dst[b, index[r]] = src[b, r]`` (``ADD``: ``+=``, atomically, in ``dst``'s dtype); else
    ``dst[b, r] = src[b, index[r]]`` (``count`` packed rows)."""
    pid = tl.program_id(0)
    b = (pid // count).to(tl.int64)
    r = (pid % count).to(tl.int64)
    other = tl.load(index + r)
    if SCATTER:
        d_row = other
        s_row = r
    else:
        d_row = r
        s_row = other
    h = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < heads) & (cols[None, :] < width)
    values = tl.load(src + b * s_b + s_row * s_n + h[:, None] * s_h + cols[None, :], mask=mask)
    target = dst + b * d_b + d_row * d_n + h[:, None] * d_h + cols[None, :]
    if ADD:
        tl.atomic_add(target, values.to(dst.dtype.element_ty), mask=mask, sem="relaxed")
    else:
        tl.store(target, values, mask=mask)
