"""``return_lse=True``: the lse of every implementation, and merging partial results (ours or a user's).

The layout (:mod:`ring_core.lse`): ``(B, H, N)``, float32 (float64 for float64 inputs), natural
log, ``-inf`` for a query that sees no key (its output is 0). Two calls over disjoint keys,
merged with :func:`ring_core.merge_attention`, equal one call over their union, outputs and
gradients (the lse is differentiable). Float64 on the CPU.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import ring_core
from distributed_helpers import run_distributed
from ring_core import merge_attention, reference_attention
from ring_core.plugin import lse_for_backward

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]
NAMES = {impl.name for impl in IMPLEMENTATIONS}
CONFIG = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
B, N, H, H_KV, D = 2, 13, 4, 2, 8


def build(impl, **config):
    return ring_core.create_attention(impl.name, **(config or CONFIG), **impl.options)


def qkv(seed: int, dtype=torch.float64, n: int = N):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, H, D, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(B, n, H_KV, D, generator=generator, dtype=torch.float64) for _ in range(2))
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def gradients(results, inputs):
    """Gradients of a loss that uses every result (``-inf`` entries of an lse left out)."""
    loss = sum(
        (torch.where(torch.isinf(r), 0, r) * torch.linspace(-1, 1, r.numel(), dtype=r.dtype).view(r.shape)).sum()
        for r in results
    )
    return torch.autograd.grad(loss, inputs)


def assert_close(actual, expected, tolerance=1e-10):
    for a, b in zip(actual, expected):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_lse_layout_and_values(impl, dtype):
    """``(B, H, N)`` in the accumulation dtype, equal to the reference's; a query that sees nothing: 0 and -inf."""
    q, k, v = qkv(0, dtype)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, :4] = True  # batch 0: the first segment of 4 is all padding; rate 2 sees only even or odd positions
    out, lse = build(impl)(q, k, v, is_causal=True, key_padding_mask=mask, return_lse=True)
    expected_out, expected_lse = reference_attention(
        q, k, v, **CONFIG, is_causal=True, key_padding_mask=mask, return_lse=True
    )
    assert lse.shape == (B, H, N) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse)) and torch.isinf(lse).any()
    seen = ~torch.isinf(expected_lse)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(lse[seen].double(), expected_lse[seen], rtol=tolerance, atol=tolerance)
    assert out.transpose(1, 2)[~seen].abs().max() == 0
    torch.testing.assert_close(out.double(), expected_out, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_merged_halves_equal_one_call(impl, causal):
    """Keys split by complementary padding masks, two calls merged: the call over all keys, gradients included."""
    q, k, v = qkv(1)
    attn = build(impl)
    half = torch.rand(B, N, generator=torch.Generator().manual_seed(2)) < 0.5
    first = attn(q, k, v, is_causal=causal, key_padding_mask=half, return_lse=True)
    second = attn(q, k, v, is_causal=causal, key_padding_mask=~half, return_lse=True)
    merged = merge_attention(*first, *second)
    whole = attn(q, k, v, is_causal=causal, return_lse=True)
    assert_close(merged, whole)
    assert_close(gradients(merged, (q, k, v)), gradients(whole, (q, k, v)), 1e-9)


def test_merge_with_the_users_own_attention():
    """Our attention over the sequence merged with a user's over extra keys (a cache, memory tokens)
    equals SDPA over all the keys: outputs and the gradients of q, k, v and the extra keys."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, N, H, D, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3))
    extra_k, extra_v = (
        torch.randn(B, 5, H, D, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2)
    )
    ours = ring_core.dilated_attention(q, k, v, segment_lengths=[N], dilation_rates=[1], return_lse=True)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, extra_k) / math.sqrt(D)  # the user's: plain softmax attention
    theirs = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), extra_v), scores.logsumexp(-1)
    out, _ = merge_attention(*ours, *theirs)
    expected = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, torch.cat([k, extra_k], 1), torch.cat([v, extra_v], 1)))
    ).transpose(1, 2)
    inputs = (q, k, v, extra_k, extra_v)
    assert_close([out], [expected])
    assert_close(gradients([out], inputs), gradients([expected], inputs), 1e-9)


def test_merge_keeps_rows_that_see_nothing_finite():
    out = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    lse = torch.full((1, 2, 3), -math.inf, dtype=torch.float64, requires_grad=True)
    merged_out, merged_lse = merge_attention(torch.zeros_like(out), lse, out, lse)
    assert merged_out.abs().max() == 0 and torch.isinf(merged_lse).all()
    grads = torch.autograd.grad(merged_out.sum(), (out, lse))
    assert all(torch.isfinite(g).all() for g in grads)


def test_lse_for_backward_gives_rows_without_keys_plus_inf_and_keeps_the_rest():
    """Rows that see no key (``-inf``) become ``+inf``, so a kernel's ``exp(s - lse)`` is 0 there, not infinite;
    finite values, ``+inf`` and NaN stay as they are; float32 and contiguous, same shape, input untouched."""
    values = [0.5, -math.inf, -3.25, math.nan, math.inf, 1e30]
    rows = torch.tensor(values, dtype=torch.float64)[None, :, None].repeat(2, 1, 3)  # (B, N, H)
    lse = rows.transpose(1, 2)  # (B, H, N), not contiguous (as a kernel's view of the final lse can be)
    got = lse_for_backward(lse)
    assert got.shape == lse.shape and got.dtype == torch.float32 and got.is_contiguous()
    expected = torch.tensor([0.5, math.inf, -3.25, math.nan, math.inf, 1e30])
    torch.testing.assert_close(got, expected.expand_as(got), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse[..., 1], torch.full((2, 3), -math.inf, dtype=torch.float64))  # input untouched
    scores = torch.randn(2, 3, 6)
    assert torch.isinf(torch.exp(scores - lse.float())[..., 1]).all()  # what a kernel would compute without it
    probabilities = torch.exp(scores - got)
    assert (probabilities[..., 1] == 0).all() and torch.isnan(probabilities[..., 3]).all()


def test_lse_gradient_matches_finite_differences():
    """gradcheck of the lse's gradient pass (dilated, causal, padding, grouped-query heads)."""
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(1, 7, 2, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 7, 1, 3, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = torch.tensor([[False, False, True, False, False, False, True]])

    def lse_only(q, k, v):
        return ring_core.dilated_attention(
            q, k, v, segment_lengths=[2, 4], dilation_rates=[1, 2], is_causal=True, key_padding_mask=mask,
            return_lse=True,
        )[1].nan_to_num(neginf=0.0)  # fmt: skip

    assert torch.autograd.gradcheck(lse_only, (q, k, v), fast_mode=True)


# -- the ring ---------------------------------------------------------------------------------------------


def _ring_merges(rank, world_size):
    from ring_core import shard_sequence

    results = {}
    q, k, v = (shard_sequence(x.detach(), "zigzag", rank=rank, world_size=world_size) for x in qkv(5, n=16))
    half = shard_sequence(
        torch.rand(B, 16, generator=torch.Generator().manual_seed(6)) < 0.5, "zigzag", rank=rank, world_size=world_size
    )
    ulysses = (
        ring_core.resolve_implementation("ring_distributed_dilated") if "ring_distributed_dilated" in NAMES else None
    )
    for impl, extra in [(impl, {}) for impl in IMPLEMENTATIONS if impl.distributed] + [
        (ulysses, {"strategy": "ulysses"})
    ]:
        if impl is None:
            continue
        config = {"segment_lengths": [4, 16], "dilation_rates": [1, 2], "layout": "zigzag", **extra}
        attn = build(impl, **config)  # the segment of 16 spans both ranks
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        first, second = (attn(*inputs, is_causal=True, key_padding_mask=m, return_lse=True) for m in (half, ~half))
        merged = merge_attention(*first, *second)
        whole = attn(*inputs, is_causal=True, return_lse=True)
        errors = [(a - b).abs().max().item() for a, b in zip(merged, whole)]
        errors += [(a - b).abs().max().item() for a, b in zip(gradients(merged, inputs), gradients(whole, inputs))]
        results[f"{impl.name} {extra}"] = errors
    return results


@pytest.mark.distributed
def test_ring_shards_merge_by_lse():
    """Two ranks, zigzag, a segment spanning both: each rank's merged shards equal its shard of one call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        results = run_distributed(_ring_merges, 2, timeout=300)
    for rank_results in results:
        assert rank_results, "no distributed implementation registered"
        for name, errors in rank_results.items():
            assert max(errors) < 1e-9, (name, errors)
