"""Dilated configurations against ``ring_core.reference_attention`` through the projections (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mh_helpers import F64, assert_close, randn

from ring_core import branch_counts, reference_attention
from ring_multihead import MultiheadDilatedAttention

E, H = 12, 4
CONFIGS = {
    "two-branches": ({"segment_lengths": [4, 8], "dilation_rates": [1, 2]}, 16),
    "odd-n": ({"segment_lengths": [3, 6, 12], "dilation_rates": [1, 2, 3]}, 13),
    "no-rate-1": ({"segment_lengths": [4, 16], "dilation_rates": [2, 4]}, 14),
    "head-groups": ({"segment_lengths": [2, 4, 8], "dilation_rates": [1, 2, 4], "merge": "head_groups"}, 11),
}


def reference_forward(module: MultiheadDilatedAttention, query, key, value, *, is_causal, key_padding_mask):
    """Projections written out, SPEC.md's reference attention, sub-LN, out_proj; batch-first tensors."""
    w, b = module.in_proj_weight, module.in_proj_bias
    heads = (module.num_heads, module.head_dim)
    q, k, v = (
        F.linear(x, wi, bi).unflatten(-1, heads) for x, wi, bi in zip((query, key, value), w.chunk(3), b.chunk(3))
    )
    config = {"segment_lengths": module.segment_lengths, "dilation_rates": module.dilation_rates, "merge": module.merge}
    out = reference_attention(q, k, v, **config, is_causal=is_causal, key_padding_mask=key_padding_mask).flatten(2)
    if module.norm is not None:
        out = module.norm(out)
    return module.out_proj(out)


def reference_probs(module, query, key, *, is_causal, key_padding_mask):
    """SPEC.md's effective probabilities ``(B, H, N, N)``: softmax over ``q.k*scale + log C``."""
    w, b = module.in_proj_weight, module.in_proj_bias
    heads = (module.num_heads, module.head_dim)
    q = F.linear(query, w[:E], b[:E]).unflatten(-1, heads)
    k = F.linear(key, w[E : 2 * E], b[E : 2 * E]).unflatten(-1, heads)
    n = q.shape[1]
    counts = branch_counts(n, H, module.segment_lengths, module.dilation_rates, module.merge)[None]
    if is_causal:
        counts = counts * torch.ones(n, n, dtype=F64).tril()
    if key_padding_mask is not None:
        counts = counts * (~key_padding_mask)[:, None, None, :].double()
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / module.head_dim**0.5
    probs = torch.softmax(scores + torch.log(counts), -1)
    return torch.nan_to_num(probs, nan=0.0)


def padding_mask(n: int) -> torch.Tensor:
    mask = torch.rand(2, n, generator=torch.Generator().manual_seed(4)) < 0.3
    mask[:, 0] = False
    return mask


def grads_of(module, inputs, forward):
    leaves = [x.clone().requires_grad_() for x in inputs]
    module.zero_grad(set_to_none=True)
    out = forward(*leaves)
    out.backward(randn(*out.shape, seed=11))
    result = {"out": out.detach(), **{f"d{i}": x.grad for i, x in enumerate(leaves)}}
    result.update({f"d{name}": p.grad.clone() for name, p in module.named_parameters()})
    return result


@pytest.mark.parametrize("layer_norm", (False, True), ids=("plain", "subln"))
@pytest.mark.parametrize("padding", (False, True), ids=("nopad", "pad"))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_matches_reference_through_projections(config, causal, padding, layer_norm):
    options, n = CONFIGS[config]
    torch.manual_seed(1)
    module = MultiheadDilatedAttention(
        E, H, batch_first=True, dtype=F64, layer_norm=layer_norm, gamma_init=1.3, **options
    )
    if layer_norm:  # a non-trivial affine sub-LN
        torch.nn.init.normal_(module.norm.weight)
        torch.nn.init.normal_(module.norm.bias)
    inputs = [randn(2, n, E, seed=i) for i in range(3)]
    mask = padding_mask(n) if padding else None
    expected = grads_of(
        module, inputs, lambda q, k, v: reference_forward(module, q, k, v, is_causal=causal, key_padding_mask=mask)
    )
    for need_weights in (False, True):  # the fast path, then the dense path
        actual = grads_of(
            module,
            inputs,
            lambda q, k, v, nw=need_weights: module(q, k, v, key_padding_mask=mask, is_causal=causal, need_weights=nw)[
                0
            ],
        )
        assert_close(actual, expected)
    with torch.no_grad():
        _, weights = module(*inputs, key_padding_mask=mask, is_causal=causal, average_attn_weights=False)
        probs = reference_probs(module, inputs[0], inputs[1], is_causal=causal, key_padding_mask=mask)
    assert_close({"weights": weights}, {"weights": probs})


@pytest.mark.parametrize("batch_first", (True, False))
@pytest.mark.parametrize(("bias_kv", "zero_attn"), [(True, False), (False, True), (True, True)])
def test_extra_keys_fast_path_equals_dense_path(bias_kv, zero_attn, batch_first):
    """add_bias_kv / add_zero_attn with dilation: the engine (extra-keys block) vs explicit probabilities."""
    module = MultiheadDilatedAttention(
        E,
        H,
        add_bias_kv=bias_kv,
        add_zero_attn=zero_attn,
        batch_first=batch_first,
        dtype=F64,
        segment_lengths=[4, 8],
        dilation_rates=[2, 4],
    )
    shape = (2, 13) if batch_first else (13, 2)
    inputs = [randn(*shape, E, seed=i) for i in range(3)]
    mask = padding_mask(13)
    results = [
        grads_of(
            module,
            inputs,
            lambda q, k, v, nw=nw: module(q, k, v, key_padding_mask=mask, is_causal=True, need_weights=nw)[0],
        )
        for nw in (False, True)
    ]
    assert_close(results[0], results[1])


def test_unbatched_equals_batch_of_one():
    module = MultiheadDilatedAttention(E, H, dtype=F64, segment_lengths=[4, 8], dilation_rates=[1, 2])
    x = randn(10, E, seed=3)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[7:] = True
    out, weights = module(x, x, x, key_padding_mask=mask, is_causal=True)
    batched, batched_weights = module(x[:, None], x[:, None], x[:, None], key_padding_mask=mask[None], is_causal=True)
    assert out.shape == (10, E) and weights.shape == (10, 10)
    torch.testing.assert_close(out, batched[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights, batched_weights[0], rtol=1e-12, atol=1e-12)


def test_queries_that_see_nothing_output_zero_attention():
    """SPEC.md: a query whose keys are all padding gets attention 0 (so the output is out_proj's bias)."""
    module = MultiheadDilatedAttention(E, H, batch_first=True, dtype=F64, segment_lengths=[4], dilation_rates=[1])
    x = randn(1, 8, E, seed=0).requires_grad_()
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[:, :4] = True
    for need_weights in (False, True):
        out, _ = module(x, x, x, key_padding_mask=mask, need_weights=need_weights)
        torch.testing.assert_close(out[:, :4], module.out_proj.bias.expand(1, 4, E), rtol=0, atol=1e-15)
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
