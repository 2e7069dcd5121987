"""The multihead modules with packed documents (``cu_seqlens``) and sliding windows (``window_size``).

A packed call equals each document run on its own (output, input and parameter
gradients), on the fast path and on the dense path (``need_weights=True``), and both
paths agree; one rank of the ring module is the single-device module.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ring_multihead import MultiheadDilatedAttention, RingMultiheadDilatedAttention

F64 = torch.float64
E, H, N = 12, 4, 30
BOUNDS = [0, 7, 7, 19, 30]  # an empty document, one shorter than a segment, others crossing segments
CONFIGS = {
    "dilated-window-causal": ({"segment_lengths": [4, 8], "dilation_rates": [1, 2], "window_size": (5, -1)}, True),
    "dense-two-sided": ({"window_size": (3, 2)}, False),
    "head-groups-bias-kv": (
        {"segment_lengths": [4, 8], "dilation_rates": [2, 4], "merge": "head_groups", "add_bias_kv": True},
        False,
    ),
}


def build(cls=MultiheadDilatedAttention, **options):
    torch.manual_seed(0)
    return cls(E, H, dtype=F64, batch_first=True, **options)


def run(module, x, **kwargs):
    leaf = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    out, _ = module(leaf, leaf, leaf, **kwargs)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=F64).reshape(out.shape))
    return out.detach(), leaf.grad, {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("need_weights", [False, True], ids=["fast", "dense"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_equals_documents_one_by_one(name, need_weights):
    options, causal = CONFIGS[name]
    module = build(**options)
    x = torch.randn(1, N, E, dtype=F64, generator=torch.Generator().manual_seed(1))
    cu_seqlens = torch.tensor(BOUNDS)
    out, dx, dparams = run(module, x, is_causal=causal, need_weights=need_weights, cu_seqlens=cu_seqlens)
    outs, dxs, dparams_alone = [], [], []
    for a, b in itertools.pairwise(BOUNDS):
        if b > a:
            weight = torch.linspace(-1, 1, N * E, dtype=F64).reshape(1, N, E)[:, a:b]
            leaf = x[:, a:b].clone().requires_grad_()
            module.zero_grad(set_to_none=True)
            doc_out, _ = module(leaf, leaf, leaf, is_causal=causal, need_weights=need_weights)
            doc_out.backward(weight)
            outs.append(doc_out.detach())
            dxs.append(leaf.grad)
            dparams_alone.append({n: p.grad.clone() for n, p in module.named_parameters()})
    torch.testing.assert_close(out, torch.cat(outs, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx, torch.cat(dxs, 1), rtol=1e-9, atol=1e-11)
    for param in dparams:
        torch.testing.assert_close(dparams[param], sum(d[param] for d in dparams_alone), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_and_dense_paths_agree(name):
    options, causal = CONFIGS[name]
    module = build(**options)
    x = torch.randn(1, N, E, dtype=F64)
    kwargs = {"is_causal": causal, "cu_seqlens": torch.tensor(BOUNDS)}
    fast = run(module, x, need_weights=False, **kwargs)
    dense = run(module, x, need_weights=True, **kwargs)
    torch.testing.assert_close(fast[0], dense[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast[1], dense[1], rtol=1e-9, atol=1e-11)


def test_one_rank_ring_module_is_the_module():
    options, causal = CONFIGS["dilated-window-causal"]
    x = torch.randn(1, N, E, dtype=F64)
    kwargs = {"is_causal": causal, "need_weights": False, "cu_seqlens": torch.tensor(BOUNDS)}
    single = run(build(**options), x, **kwargs)
    ring = run(build(RingMultiheadDilatedAttention, **options), x, **kwargs)
    torch.testing.assert_close(ring[0], single[0], rtol=0, atol=0)


def test_positions_need_self_attention():
    x, memory = torch.randn(1, 8, E, dtype=F64), torch.randn(1, 5, E, dtype=F64)
    with pytest.raises(ValueError, match="window_size needs self-attention .* got lengths 8 and 5"):
        build(window_size=(2, 0))(x, memory, memory)
    with pytest.raises(ValueError, match="cu_seqlens needs self-attention"):
        build()(x, memory, memory, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="cu_seqlens must end at N=8"):
        build()(x, x, x, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"window_size must be \(left, right\) with each >= -1"):
        build(window_size=(-5, 0))
