"""Partial attention results and their log-sum-exp: the public ``lse`` layout and the merge.

Every implementation's forward takes ``return_lse=True`` and then returns ``(out, lse)``:

- ``out``: ``(B, N, H, D)``, as without it;
- ``lse``: ``(B, H, N)`` (flash-attn's ``softmax_lse`` and SDPA's ``logsumexp`` layout),
  float32 (float64 for float64 inputs), natural log: ``lse[b, h, t] = log sum_s C[h,t,s] *
  exp(scale * q_t . k_s)`` over the keys query ``t`` sees (SPEC.md; ``C`` counts the dilated
  branches that select a key). A query that sees no key (padding, or no branch selects it)
  gets ``out = 0`` and ``lse = -inf``. Under sequence parallelism both are this rank's rows.

``lse`` is differentiable: a loss that uses it (a merge with another attention) gets
exact gradients for ``q`` and ``k``.

Two results over disjoint sets of keys for the same queries merge into the result over
their union with :func:`merge_attention`; so a user can combine our attention with their own
(extra keys, a cache, another sequence), as long as the other side computes its ``lse`` over
the same scaled scores.

A fused backward kernel (flash-attn's) takes the final ``lse`` as :func:`lse_for_backward` gives it.
"""

from __future__ import annotations

import torch

from .kernels import accumulation_dtype

__all__ = ["lse_for_backward", "merge_attention"]


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results of the same queries over disjoint key sets: ``(out, lse)`` over the union.

    ``out_*`` are ``(B, N, H, D)``, ``lse_*`` ``(B, H, N)`` (the layout of ``return_lse=True``).
    ``lse = logaddexp(lse_a, lse_b)`` and ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) *
    out_b``, in float32 (float64 for float64 inputs); ``out`` comes back in ``out_a``'s dtype,
    ``lse`` in the accumulation dtype. A row that sees no key on either side stays ``out = 0``,
    ``lse = -inf``. Differentiable, with finite gradients everywhere (also on such rows).
    """
    dtype = accumulation_dtype(out_a.dtype)
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)  # -inf on both sides: any finite shift
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = weight_a + weight_b
    seen = total > 0
    lse = torch.where(seen, top + torch.log(torch.where(seen, total, torch.ones_like(total))), float("-inf"))
    total = torch.where(seen, total, torch.ones_like(total))
    out = (weight_a / total).transpose(1, 2).unsqueeze(-1) * out_a.to(dtype)
    out = out + (weight_b / total).transpose(1, 2).unsqueeze(-1) * out_b.to(dtype)
    return out.to(out_a.dtype), lse


def lse_for_backward(lse: torch.Tensor) -> torch.Tensor:
    """The final ``lse`` as a fused backward kernel takes it: float32, contiguous, ``+inf`` where it is ``-inf``.

    Such kernels (flash-attn's) recompute each probability as ``exp(s - lse)``. A row that sees
    no key anywhere has ``lse = -inf`` (and ``out = 0``), which would make that ``exp(+inf)``:
    infinite gradients. With ``+inf`` every probability of the row is ``exp(-inf) = 0``, so its
    gradients are 0, as they should be for a constant output. Every other value is kept as it
    is, NaN included (a NaN in the lse shows in the gradients, it is not hidden). Same shape.
    """
    lse = lse.float()
    return lse.masked_fill(torch.isneginf(lse), float("inf")).contiguous()


def lse_probe(
    v: torch.Tensor, out: torch.Tensor, dlse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dout', v', out')`` that make any attention backward give the gradient of the final ``lse``.

    ``d lse_t / d s_ts`` is the final probability ``P_ts``, and a backward from the final
    ``out``/``lse`` computes ``dS = P * (dout . v - rowsum(dout * out))``: for ``v' = 0``, ``dout'``
    the first unit vector and ``out'`` holding ``-dlse`` in its first channel that is ``P * dlse``.
    So one more backward pass over the same blocks with these (``dq``, ``dk`` added; its ``dv`` is
    0 and dropped) adds the lse's gradient, whatever computes the blocks. ``dlse``: ``(B, N, H)``
    like the engine's ``lse``; ``out'`` keeps ``out``'s dtype.
    """
    probe = torch.zeros_like(out)
    probe[..., 0] = 1
    shifted = torch.zeros_like(out)
    shifted[..., 0] = -dlse.to(out.dtype)
    return probe, torch.zeros_like(v), shifted
