"""One Triton pass for the incoming gradients of a strip call's ``(o, lse)`` (see :func:`ring_blocksparse.flex.grad_inputs`).

Per row: ``w = exp(lse_call - lse)`` (0 where ``lse`` is ``-inf``), ``grad_o = w * dout`` and
``grad_lse = w * sum(dout * (o - out))``, in float32, reading ``dout``, ``o`` and ``out`` once.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grad_inputs_kernel(
    do_ptr, o_ptr, out_ptr, lse_call_ptr, lse_ptr, go_ptr, gl_ptr,
    rows, heads, length, width,
    s_do_b, s_do_h, s_do_n, s_o_b, s_o_h, s_o_n, s_out_b, s_out_h, s_out_n,
    s_lc_b, s_lc_h, s_lc_n, s_l_b, s_l_h, s_l_n, s_go_b, s_go_h, s_go_n, s_gl_b, s_gl_h, s_gl_n,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < rows
    b = (r // (heads * length)).to(tl.int64)  # 64-bit offsets: tensors may exceed 2**31 elements
    h = ((r // length) % heads).to(tl.int64)
    n = (r % length).to(tl.int64)
    mask = row_ok[:, None] & (d < width)[None, :]
    do = tl.load(do_ptr + (b * s_do_b + h * s_do_h + n * s_do_n)[:, None] + d[None, :], mask=mask, other=0.0)
    o = tl.load(o_ptr + (b * s_o_b + h * s_o_h + n * s_o_n)[:, None] + d[None, :], mask=mask, other=0.0)
    out = tl.load(out_ptr + (b * s_out_b + h * s_out_h + n * s_out_n)[:, None] + d[None, :], mask=mask, other=0.0)
    do, o, out = do.to(tl.float32), o.to(tl.float32), out.to(tl.float32)
    lse_call = tl.load(lse_call_ptr + b * s_lc_b + h * s_lc_h + n * s_lc_n, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + b * s_l_b + h * s_l_h + n * s_l_n, mask=row_ok, other=float("-inf"))
    finite = lse > float("-inf")
    w = tl.where(finite, tl.exp(lse_call - tl.where(finite, lse, 0.0)), 0.0)
    go = (do * w[:, None]).to(go_ptr.dtype.element_ty)
    tl.store(go_ptr + (b * s_go_b + h * s_go_h + n * s_go_n)[:, None] + d[None, :], go, mask=mask)
    tl.store(gl_ptr + b * s_gl_b + h * s_gl_h + n * s_gl_n, w * tl.sum(do * (o - out), 1), mask=row_ok)
