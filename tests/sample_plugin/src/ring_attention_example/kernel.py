"""A kernel backend: how one block of attention is computed."""

from __future__ import annotations

import torch

from ring_core.plugin import KernelBackend, accumulation_dtype


class EinsumKernel(KernelBackend):
    """One block with two einsums, scores in float64: slow, short and exact.

    ``q`` is ``(b, n, h, d)``; ``k``/``v`` are ``(b, m, h_kv, d)``. ``forward`` returns
    ``out`` ``(b, n, h, d)`` and the natural-log ``lse`` ``(b, h, n)``; a row that sees
    no key gets ``out = 0``, ``lse = -inf``.
    """

    # What it supports, as data: the base class turns these into reasons.
    name = "example_einsum"
    priority = -10  # below ring-core's kernels: used only when asked for by name
    description = "two einsums in float64 (the plugin-author guide's example)"
    devices = ("cpu",)
    dtypes = (torch.float64, torch.float32)
    supports_dropout = False

    def forward(self, q, k, v, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        k, v, _ = _repeat_kv(q, k, v)
        scores = _scores(q, k, scale, causal, mask)  # (b, h, n, m) float64
        lse = torch.logsumexp(scores, dim=-1)  # -inf where a row sees nothing
        probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
        out = torch.einsum("bhnm,bmhd->bnhd", probs, v.double())
        return out.to(q.dtype), lse.to(accumulation_dtype(q.dtype))

    def backward(self, dout, q, k, v, out, lse, *, scale, causal=False, mask=None, dropout_p=0.0, seed=0):
        kv_heads = k.shape[2]
        k, v, groups = _repeat_kv(q, k, v)
        # ``out`` and ``lse`` are the FINAL merged values of these query rows, so
        # ``probs`` are this block's share of the full softmax: the gradients below
        # are exact contributions that the engine adds up.
        probs = torch.exp(_scores(q, k, scale, causal, mask) - lse.double().nan_to_num(neginf=0.0).unsqueeze(-1))
        dout64 = dout.double()
        dv = torch.einsum("bhnm,bnhd->bmhd", probs, dout64)
        dprobs = torch.einsum("bnhd,bmhd->bhnm", dout64, v.double())
        delta = (dout64 * out.double()).sum(-1).transpose(1, 2).unsqueeze(-1)  # (b, h, n, 1)
        dscores = probs * (dprobs - delta) * scale
        dq = torch.einsum("bhnm,bmhd->bnhd", dscores, k.double())
        dk = torch.einsum("bhnm,bnhd->bmhd", dscores, q.double())
        if groups > 1:  # grouped-query attention: sum the query heads that share a kv head
            dk = dk.unflatten(2, (kv_heads, groups)).sum(3)
            dv = dv.unflatten(2, (kv_heads, groups)).sum(3)
        acc = accumulation_dtype(q.dtype)
        return dq.to(acc), dk.to(acc), dv.to(acc)


def _repeat_kv(q, k, v):
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    return k, v, groups


def _scores(q, k, scale, causal, mask):
    """Scaled scores ``(b, h, n, m)`` in float64, ``-inf`` where a key is not allowed."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * scale
    n, m = scores.shape[-2:]
    if causal:  # square blocks only: query i sees key j iff j <= i
        scores = scores.masked_fill(~torch.ones(n, m, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:  # bool, broadcastable to (b, h, n, m), True = allowed
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores
