"""Dense attention as one kernel call each way: no accumulators, no merge.

With a dense configuration and nothing else (no padding, no extra keys, no dropout), the
whole attention is one block: the kernel's own output and log-sum-exp are the result, and
its backward with them gives the exact gradients. Going through the blockwise engine would
add float32 accumulators for the output and the three gradients and a pass over each, which
is what ``nn.MultiheadAttention`` (one SDPA call) does not pay.
"""

from __future__ import annotations

import torch

from ring_core.plugin import KernelBackend, block_kernel

__all__ = ["one_block_attention"]


class _OneBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: KernelBackend, scale: float, causal: bool, q, k, v):  # type: ignore[override]
        out, lse = backend.forward(q, k, v, scale=scale, causal=causal)
        ctx.backend, ctx.scale, ctx.causal = backend, scale, causal
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout.contiguous(), q, k, v, out, lse, scale=ctx.scale, causal=ctx.causal)
        return None, None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def one_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool) -> torch.Tensor:
    """Softmax attention of ``q`` ``(B, L, H, D)`` over all of ``k``, ``v`` ``(B, S, H, D)`` (causal: ``L == S``)."""
    bound = block_kernel(q, k, causal=is_causal)
    return _OneBlock.apply(bound.backend, bound.scale, is_causal, q, k, v)
