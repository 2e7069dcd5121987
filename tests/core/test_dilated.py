"""DilatedAttention beyond the conformance cases: dtypes, dropout, LSE, memory shape of the engine."""

from __future__ import annotations

import pytest
import torch

import ring_core
from ring_core import dilated_attention, merge_into, reference_attention
from ring_core.testing import relative_error


def test_merge_is_exact_and_handles_empty_rows():
    scores = torch.randn(3, 10, dtype=torch.float64)
    values = torch.randn(10, 4, dtype=torch.float64)
    scores[2] = float("-inf")  # a row that sees nothing in either half
    full = torch.softmax(scores[:2], -1) @ values
    out = torch.zeros(3, 4, dtype=torch.float64)
    lse = torch.full((3,), float("-inf"), dtype=torch.float64)
    for part in (slice(0, 6), slice(6, 10)):
        block_lse = torch.logsumexp(scores[:, part], -1)
        block_out = torch.nan_to_num(torch.softmax(scores[:, part], -1)) @ values[part]
        merge_into(out, lse, block_out, block_lse)
    torch.testing.assert_close(out[:2], full, rtol=1e-12, atol=1e-12)
    assert out[2].abs().max() == 0 and lse[2] == float("-inf")


def test_lse_matches_reference_logsumexp():
    q, k, v = (torch.randn(1, 12, 2, 4, dtype=torch.float64) for _ in range(3))
    _, lse = dilated_attention(q, k, v, segment_lengths=[12], dilation_rates=[1], return_lse=True)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / 2.0
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype):
    """Low precision inputs: within SPEC.md's bounds of the float64 reference."""
    q, k, v = (torch.randn(1, 64, 4, 16, dtype=torch.float64) for _ in range(3))
    config = {"segment_lengths": [16, 32], "dilation_rates": [1, 2]}
    out = dilated_attention(q.to(dtype), k.to(dtype), v.to(dtype), **config, is_causal=True)
    assert out.dtype == dtype
    ref = reference_attention(q, k, v, **config, is_causal=True)
    assert relative_error(out, ref) < 1e-2


def test_dropout_is_deterministic_per_call_and_gradients_are_exact():
    """The math kernel regenerates the same dropout mask in backward: gradcheck holds."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 10, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attn = ring_core.DilatedAttention([4, 8], [1, 2], dropout=0.3).train()

    def fn(q, k, v):
        torch.manual_seed(1234)  # the per-call dropout seed is drawn from torch's RNG
        return attn(q, k, v, is_causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    a, b = fn(q, k, v), fn(q, k, v)
    assert torch.equal(a, b)
    without = ring_core.DilatedAttention([4, 8], [1, 2]).eval()(q, k, v, is_causal=True)
    assert not torch.allclose(a, without)
    assert torch.equal(attn.eval()(q, k, v, is_causal=True), without)  # eval: no dropout


def test_no_divisibility_and_segment_larger_than_n():
    q, k, v = (torch.randn(2, 13, 4, 4, dtype=torch.float64) for _ in range(3))
    config = {"segment_lengths": [3, 6, 102], "dilation_rates": [1, 3, 6]}
    out = dilated_attention(q, k, v, **config)
    torch.testing.assert_close(out, reference_attention(q, k, v, **config), rtol=1e-10, atol=1e-12)


def test_module_repr_and_kernel_choice():
    attn = ring_core.create_attention("dilated", segment_lengths=[4, 8], dilation_rates=[1, 2], kernel="math")
    assert "segment_lengths=[4, 8]" in repr(attn)
    q = torch.randn(1, 8, 2, 4)
    assert attn(q, q, q).shape == q.shape
