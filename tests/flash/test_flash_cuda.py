"""ring-flash on a CUDA GPU: every available backend against the math kernel and the float64 reference."""

from __future__ import annotations

import pytest
import torch

import ring_core
from ring_core.testing import CASES, TOLERANCES, Case, check_attention, make_inputs, reference_outputs, relative_error
from ring_flash import RingDilatedAttentionFlash
from ring_flash.kernels import all_kernels

pytestmark = pytest.mark.cuda

BACKENDS = [k.name for k in all_kernels()]
DIVISIBLE_CASES = (
    Case("dense-128", 128, 4, (128,), (1,), head_dim=64),
    Case("dilated-256", 256, 4, (64, 128, 256), (1, 2, 4), head_dim=64),
    Case("dilated-256-causal", 256, 4, (64, 128, 256), (1, 2, 4), head_dim=64, causal=True),
)
BATCH1_CASES = (
    Case("batch1-256-causal", 256, 8, (64, 128, 256), (1, 2, 4), head_dim=64, batch=1, causal=True),
    Case("batch1-tail", 200, 8, (64, 128), (2, 4), head_dim=64, batch=1),
    Case("batch1-pad", 256, 8, (64, 128), (1, 2), head_dim=64, batch=1, padding=True),
    Case("batch1-gqa-chunked", 256, 8, (64, 128), (1, 2), head_dim=64, batch=1, kv_heads=2, causal=True),
)


def backend_or_skip(name, request):
    backend = ring_core.get_registry().kernels[name]
    reasons = backend.not_supported_reasons(request)
    if reasons:
        pytest.skip(f"{name}: {'; '.join(reasons)}")
    return backend


def rel(a, b):
    return relative_error(a.float(), b.float())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_backend_matches_math_kernel(name, dtype, causal, kv_heads):
    """Forward (out, lse) and backward with a foreign out/lse (as after a merge) against the math kernel."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 80, 4, 64, device="cuda", generator=gen).to(dtype)
    k, v = (torch.randn(3, 80, kv_heads, 64, device="cuda", generator=gen).to(dtype) for _ in range(2))
    backend = backend_or_skip(name, ring_core.KernelRequest.for_tensors(q, k, causal=causal))
    math = ring_core.MathKernel()
    scale = 0.125
    out, lse = backend.forward(q, k, v, scale=scale, causal=causal)
    ref_out, ref_lse = math.forward(q.float(), k.float(), v.float(), scale=scale, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (3, 4, 80)
    assert rel(out, ref_out) < 1e-2 and (lse.float() - ref_lse).abs().max() < 2e-2
    # backward with an out/lse that is not the block's own: a second block of keys merged in
    other_lse = ref_lse + 0.3
    total = torch.logaddexp(ref_lse, other_lse)
    final_out = (ref_out * torch.exp(ref_lse - total).transpose(1, 2).unsqueeze(-1)).to(dtype)
    dout = torch.randn(q.shape, device="cuda", generator=gen).to(dtype)
    grads = backend.backward(dout, q, k, v, final_out, total, scale=scale, causal=causal)
    expected = math.backward(
        dout.float(), q.float(), k.float(), v.float(), final_out.float(), total, scale=scale, causal=causal
    )
    for name_, got, want in zip(("dq", "dk", "dv"), grads, expected):
        assert got.shape == want.shape, name_
        assert rel(got, want) < 2e-2, (name_, rel(got, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_efficient_backend_masks_and_empty_rows(dtype, causal):
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(2, 40, 2, 32, device="cuda", generator=gen).to(dtype) for _ in range(3))
    mask = torch.rand(2, 1, 1, 40, device="cuda", generator=gen) > 0.3
    mask[0, ..., :5] = False  # with causal, the first rows of batch 0 see nothing
    mask[1] = False  # batch 1 sees nothing at all
    backend = backend_or_skip("sdpa_efficient", ring_core.KernelRequest.for_tensors(q, k, causal=causal, has_mask=True))
    math = ring_core.MathKernel()
    out, lse = backend.forward(q, k, v, scale=0.2, causal=causal, mask=mask)
    ref_out, ref_lse = math.forward(q.float(), k.float(), v.float(), scale=0.2, causal=causal, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert out[1].abs().max() == 0
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() < 2e-2 and rel(out, ref_out) < 1e-2
    dout = torch.randn(q.shape, device="cuda", generator=gen).to(dtype)
    grads = backend.backward(dout, q, k, v, out, lse, scale=0.2, causal=causal, mask=mask)
    expected = math.backward(dout.float(), q.float(), k.float(), v.float(), out.float(), ref_lse, scale=0.2,
                             causal=causal, mask=mask)  # fmt: skip
    for got, want in zip(grads, expected):
        assert torch.isfinite(got).all() and rel(got, want) < 2e-2
    assert grads[0][1].abs().max() == 0


def sdpa_error(case, dtype, seed):
    """Relative output error of plain SDPA (dense, same inputs) against the float64 reference."""
    dense = Case("dense", case.seq_len, case.heads, (case.seq_len,), (1,), head_dim=case.head_dim, batch=case.batch,
                 causal=case.causal)  # fmt: skip
    q, k, v, _ = make_inputs(dense, dtype, "cuda", seed=seed)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=case.causal
    ).transpose(1, 2)
    ref = reference_outputs(dense, q, k, v, None, torch.zeros(out.shape, dtype=torch.float64))["out"]
    return relative_error(out, ref)


@pytest.mark.parametrize("case", CASES + DIVISIBLE_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_ring_dilated_flash_low_precision(case, dtype):
    """SPEC.md: within 1e-2 / 2e-2 of the float64 reference, output error no worse than 2x SDPA's."""
    attn = ring_core.create_attention("ring_dilated_flash", **case.config)
    result = check_attention(attn, case, dtype, device="cuda", seed=5)
    assert result.passed, result.errors
    assert result.errors["out"] <= max(2 * sdpa_error(case, dtype, 5), TOLERANCES[dtype][0] / 10), result.errors


@pytest.mark.parametrize("case", CASES + DIVISIBLE_CASES, ids=str)
@pytest.mark.parametrize("name", BACKENDS)
def test_each_backend_through_both_paths(name, case):
    """Every backend forced through core's engine (DilatedAttention) and through the fused path."""
    ran = 0
    for attn, kv_heads in (
        (ring_core.DilatedAttention(**case.config, kernel=name), case.kv_heads or case.heads),
        (RingDilatedAttentionFlash(**case.config, kernel=name), case.heads),  # calls expand kv heads
    ):
        request = ring_core.KernelRequest(
            "cuda", torch.bfloat16, case.head_dim, case.heads, kv_heads, causal=case.causal, has_mask=case.padding,
            compute_capability=torch.cuda.get_device_capability(),
        )  # fmt: skip
        if ring_core.get_registry().kernels[name].not_supported_reasons(request):
            continue
        result = check_attention(attn, case, torch.bfloat16, device="cuda", seed=2)
        assert result.passed, (type(attn).__name__, result.errors)
        ran += 1
    if not ran:
        backend_or_skip(name, request)


@pytest.mark.parametrize("triton", ["1", "0"], ids=["triton-merge", "torch-merge"])
@pytest.mark.parametrize("case", BATCH1_CASES, ids=str)
def test_fused_merges_on_cuda(case, triton, monkeypatch):
    """The fused path's merges (Triton or torch), with small chunks."""
    from ring_flash.fused import fused_dilated_attention

    monkeypatch.setenv("RING_FLASH_TRITON", triton)

    class Fused(torch.nn.Module):
        def forward(self, q, k, v, *, is_causal=False, key_padding_mask=None):
            backend = ring_core.select_kernel(RingDilatedAttentionFlash.request(q, k, is_causal, key_padding_mask))
            return fused_dilated_attention(q, k, v, backend=backend, scale=q.shape[-1] ** -0.5, is_causal=is_causal,
                                           key_padding_mask=key_padding_mask, max_rows=1024,
                                           **case.config)[0]  # fmt: skip

    result = check_attention(Fused(), case, torch.bfloat16, device="cuda", seed=4)
    assert result.passed, result.errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_triton_merge_equals_torch_merge(dtype, monkeypatch):
    from ring_flash.merge import merge_block

    full = torch.randn(2, 96, 8, 64, device="cuda", dtype=dtype)
    src = torch.randn(2, 3, 16, 4, 64, device="cuda", dtype=dtype)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("RING_FLASH_TRITON", flag)
        for accumulate in (False, True):
            dst = full.clone()
            merge_block(dst[:, 1::2, 1::2].unflatten(1, (3, 16)), src, accumulate=accumulate)
            results.append(dst.float())
    for triton, torch_ in zip(results[:2], results[2:]):
        assert rel(triton, torch_) < (1e-6 if dtype == torch.float32 else 4e-3)
        assert torch.isfinite(triton).all()


def test_triton_online_merge_equals_merge_into():
    from ring_core.kernels import merge_into
    from ring_flash.merge import online_merge

    out = torch.randn(2, 96, 8, 64, device="cuda")
    lse = torch.randn(2, 96, 8, device="cuda")
    lse[0, 1, 1] = float("-inf")  # a row nothing was seen in yet
    block = torch.randn(2, 3, 16, 4, 64, device="cuda", dtype=torch.bfloat16)
    block_lse = torch.randn(6, 4, 16, device="cuda").unflatten(0, (2, 3)).transpose(-1, -2)
    block_lse[0, 0, 0, 0] = float("-inf")  # ... and still nothing (row stays 0, -inf)
    block_lse[1, 0, 0, 0] = float("-inf")

    def view(x):
        return x[:, 1::2, 1::2].unflatten(1, (3, 16))

    expected, expected_lse = out.clone(), lse.clone()
    merge_into(view(expected), view(expected_lse), block, block_lse)
    low, low_lse = out.to(torch.bfloat16), lse.clone()  # an output-dtype accumulator (the fused forward's)
    assert online_merge(view(out), view(lse), block, block_lse)
    assert rel(out, expected) < 1e-6
    assert torch.equal(torch.isinf(lse), torch.isinf(expected_lse))
    finite = torch.isfinite(expected_lse)
    assert rel(lse[finite], expected_lse[finite]) < 1e-6
    expected = low.float()
    merge_into(view(expected), view(low_lse.clone()), block, block_lse)
    assert online_merge(view(low), view(low_lse), block, block_lse)
    assert rel(low, expected) < 4e-3  # one bfloat16 rounding


def test_triton_merge_of_three_pairs_in_one_launch():
    from ring_flash.merge import merge_blocks

    grads = [torch.randn(1, 64, 8, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    blocks = [torch.randn(1, 2, 16, 4, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    for accumulate in (False, True):
        expected = [g.clone() for g in grads]
        for g, b in zip(expected, blocks):
            view = g[:, 1::2, ::2].unflatten(1, (2, 16))
            view.add_(b) if accumulate else view.copy_(b)
        merged = [g.clone() for g in grads]
        merge_blocks([g[:, 1::2, ::2].unflatten(1, (2, 16)) for g in merged], blocks, accumulate=accumulate)
        for got, want in zip(merged, expected):
            assert rel(got, want) < 4e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_high_precision_on_cuda_uses_exact_kernels(dtype):
    case = CASES[3]
    result = check_attention(RingDilatedAttentionFlash(**case.config), case, dtype, device="cuda", seed=3)
    assert result.passed, result.errors


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dense_is_sdpa(causal):
    q, k, v = (torch.randn(2, 512, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = RingDilatedAttentionFlash([512], [1])(q, k, v, is_causal=causal)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
    ).transpose(1, 2)
    assert rel(out, expected) < 1e-2


def test_chunked_calls_equal_whole_calls():
    from ring_flash.fused import fused_dilated_attention

    q, k, v = (torch.randn(1, 4096, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    backend = ring_core.select_kernel(ring_core.KernelRequest.for_tensors(q, k, causal=True))
    results = []
    for max_rows in (1 << 23, 1024):
        out, _ = fused_dilated_attention(q, k, v, backend=backend, scale=0.125, segment_lengths=[512, 1024],
                                         dilation_rates=[1, 2], is_causal=True, max_rows=max_rows)  # fmt: skip
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results.append((out, *grads))
    for whole, chunked in zip(*results):
        assert rel(chunked, whole) < 1e-3


def test_auto_and_dispatch_on_this_card():
    attn = ring_core.create_attention("auto", segment_lengths=[64], dilation_rates=[1])
    assert isinstance(attn, RingDilatedAttentionFlash)
    q = torch.randn(1, 64, 4, 128, device="cuda", dtype=torch.bfloat16)  # the head dim the tables measure
    chosen = ring_core.select_kernel(RingDilatedAttentionFlash.request(q, q))
    if ring_core.get_registry().kernels["tuned"].table() is not None:  # a measured table for this card
        assert chosen.name == "tuned"
    elif torch.cuda.get_device_capability() >= (9, 0):
        assert chosen.name == "sdpa_cudnn"
    else:
        assert chosen.name.startswith(("sdpa", "flash_attn"))
