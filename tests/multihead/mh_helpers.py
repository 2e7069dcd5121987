"""Shared helpers of the ring-multihead tests."""

from __future__ import annotations

import torch
from torch import nn

from ring_core.testing import relative_error
from ring_multihead import MultiheadDilatedAttention

F64 = torch.float64


def pair(embed_dim: int = 12, num_heads: int = 3, seed: int = 0, **kwargs):
    """An ``nn.MultiheadAttention`` and a ``MultiheadDilatedAttention`` with the same weights (float64)."""
    mha_kwargs = {k: v for k, v in kwargs.items() if k not in ("segment_lengths", "dilation_rates", "merge")}
    torch.manual_seed(seed)
    reference = nn.MultiheadAttention(embed_dim, num_heads, dtype=F64, **mha_kwargs)
    ours = MultiheadDilatedAttention(embed_dim, num_heads, dtype=F64, layer_norm=False, **kwargs)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def run(module, inputs, grad_out, grad_weights, **kwargs):
    """Forward, a loss mixing the output and the weights, backward; returns output, weights and grads."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    module.zero_grad(set_to_none=True)
    out, weights = module(*leaves, **kwargs)
    loss = (out * grad_out).sum()
    if weights is not None:
        loss = loss + (weights * grad_weights(weights.shape)).sum()
    loss.backward()
    grads = {f"d{name}": x.grad for name, x in zip(("query", "key", "value"), leaves)}
    grads.update({f"d{name}": p.grad for name, p in module.named_parameters()})
    return out, weights, grads


def assert_close(actual: dict, expected: dict, tol: float = 1e-10) -> None:
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for name in expected:
        a, e = actual[name], expected[name]
        if e is None:
            assert a is None, f"{name}: expected None"
            continue
        assert a is not None and a.shape == e.shape, f"{name}: shape {None if a is None else a.shape} != {e.shape}"
        err = relative_error(a, e)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol}"


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
