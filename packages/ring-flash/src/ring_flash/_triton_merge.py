"""The Triton kernels behind :mod:`ring_flash.merge` (imported only when Triton is present)."""

import triton
import triton.language as tl


@triton.jit
def _rows(rows, n1, n2, n3, BLOCK_R: tl.constexpr):
    """This program's rows as indices ``(i0, i1, i2, i3)`` of the leading dims (int64), and which exist."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    i3 = row % n3
    rest = row // n3
    i2 = rest % n2
    rest = rest // n2
    return rest // n1, rest % n1, i2, i3, row < rows


@triton.jit
def _row(index, i2, row_ok, INDEXED: tl.constexpr):
    """A tensor's index along leading dim 2: ``i2``, or ``index[i2]`` (packed rows gathered from its rows)."""
    if INDEXED:
        return tl.load(index + i2, mask=row_ok, other=0).to(tl.int64)
    return i2


@triton.jit
def merge_kernel(
    dst, src, index, rows, n1, n2, n3, ds0, ds1, ds2, ds3, ss0, ss1, ss2, ss3,
    width, dst_shift1, dst_shift2, src_shift1, src_shift2,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACCUMULATE: tl.constexpr,
    DST_INDEXED: tl.constexpr, SRC_INDEXED: tl.constexpr,
):  # fmt: skip
    """Rows ``(i0, i1, i2, i3)`` of ``width`` contiguous elements: ``dst (+)= src`` (added in float32).

    Program axis 1 picks one of up to three tensor pairs laid out alike: pair ``j``
    starts ``dst_shift<j>`` / ``src_shift<j>`` elements after the first pair. ``DST_INDEXED``:
    ``src``'s row ``i2`` goes to ``dst``'s row ``index[i2]`` (distinct rows: no two programs write one);
    ``SRC_INDEXED``: ``dst``'s row ``i2`` is ``src``'s row ``index[i2]`` (a gather).
    """
    pair = tl.program_id(1)
    if pair == 1:
        dst += dst_shift1
        src += src_shift1
    elif pair == 2:
        dst += dst_shift2
        src += src_shift2
    i0, i1, i2, i3, row_ok = _rows(rows, n1, n2, n3, BLOCK_R)
    col = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (col < width)[None, :]
    s2 = _row(index, i2, row_ok, SRC_INDEXED)
    x = tl.load(src + (i0 * ss0 + i1 * ss1 + s2 * ss2 + i3 * ss3)[:, None] + col[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)
    d2 = _row(index, i2, row_ok, DST_INDEXED)
    target = dst + (i0 * ds0 + i1 * ds1 + d2 * ds2 + i3 * ds3)[:, None] + col[None, :]
    if ACCUMULATE:
        x += tl.load(target, mask=ok, other=0.0).to(tl.float32)
    tl.store(target, x.to(dst.dtype.element_ty), mask=ok)


@triton.jit
def online_merge_kernel(
    acc, acc_lse, blk, blk_lse, index, rows, n1, n2, n3,
    as0, as1, as2, as3, als0, als1, als2, als3, bs0, bs1, bs2, bs3, bls0, bls1, bls2, bls3,
    width,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INDEXED: tl.constexpr,
):  # fmt: skip
    """``acc, acc_lse <- LSE merge of (acc, acc_lse) and (blk, blk_lse)``, rows as in :func:`merge_kernel` (with
    ``INDEXED``, ``acc``'s rows ``index[i2]``); computed in float32 and stored in ``acc``'s dtype."""
    i0, i1, i2, i3, row_ok = _rows(rows, n1, n2, n3, BLOCK_R)
    col = tl.arange(0, BLOCK_D)
    ok = row_ok[:, None] & (col < width)[None, :]
    d2 = _row(index, i2, row_ok, INDEXED)
    lse_at = acc_lse + i0 * als0 + i1 * als1 + d2 * als2 + i3 * als3
    a = tl.load(lse_at, mask=row_ok, other=float("-inf"))
    b = tl.load(blk_lse + i0 * bls0 + i1 * bls1 + i2 * bls2 + i3 * bls3, mask=row_ok, other=float("-inf"))
    b = b.to(tl.float32)
    top = tl.maximum(a, b)
    empty = top == float("-inf")
    top = tl.where(empty, 0.0, top)
    wa = tl.exp(a - top)
    wb = tl.exp(b - top)
    total = wa + wb
    new = tl.where(empty, float("-inf"), top + tl.log(total))
    wa = tl.where(empty, 0.0, wa / total)
    wb = tl.where(empty, 0.0, wb / total)
    out_at = acc + (i0 * as0 + i1 * as1 + d2 * as2 + i3 * as3)[:, None] + col[None, :]
    x = tl.load(out_at, mask=ok, other=0.0) * wa[:, None]
    y = tl.load(blk + (i0 * bs0 + i1 * bs1 + i2 * bs2 + i3 * bs3)[:, None] + col[None, :], mask=ok, other=0.0)
    tl.store(out_at, (x + y.to(tl.float32) * wb[:, None]).to(acc.dtype.element_ty), mask=ok)
    tl.store(lse_at, new, mask=row_ok)
