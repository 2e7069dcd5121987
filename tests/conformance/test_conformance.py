"""Every registered, available attention implementation vs the float64 reference of SPEC.md.

A new implementation is covered the moment it registers: its ``Implementation``
record's ``options`` supply any extra constructor arguments it needs.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import ring_core
from ring_core.testing import CASES, PACKED_CASES, TOLERANCES, check_attention, make_inputs, relative_error

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]
KERNELS = [k.name for k in ring_core.list_kernels()]


def build(impl, case, **extra):
    return ring_core.create_attention(impl.name, **case.config, **impl.options, **extra)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_matches_reference(impl, case, dtype):
    result = check_attention(
        build(impl, case), case, dtype, seed=zlib.crc32(f"{impl.name}/{case.name}".encode()) % 1000
    )
    assert result.passed, f"{impl.name} {case} {dtype}: errors {result.errors} > {result.tolerance}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", PACKED_CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_packed_and_windowed_match_reference(impl, case, dtype):
    """Packed documents (cu_seqlens) and sliding windows vs the float64 reference of SPEC.md."""
    result = check_attention(
        build(impl, case), case, dtype, seed=zlib.crc32(f"{impl.name}/{case.name}".encode()) % 1000
    )
    assert result.passed, f"{impl.name} {case} {dtype}: errors {result.errors} > {result.tolerance}"


@pytest.mark.parametrize("case", [c for c in PACKED_CASES if c.documents], ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_packed_equals_documents_one_by_one(impl, case):
    """SPEC.md: a packed call equals each document run on its own, concatenated (output and gradients)."""
    q, k, v, mask = make_inputs(case, torch.float64, seed=11)
    dout = torch.randn(q.shape[:3] + v.shape[3:], dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    attn = build(impl, case)
    packed = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attn(*packed, is_causal=case.causal, key_padding_mask=mask, **case.forward_options())
    out.backward(dout)
    pieces = {"out": [], "dq": [], "dk": [], "dv": []}
    for start, stop in zip(case.documents[:-1], case.documents[1:]):
        if stop == start:
            continue
        alone = [x[:, start:stop].clone().requires_grad_() for x in (q, k, v)]
        doc_mask = None if mask is None else mask[:, start:stop]
        doc_out = attn(*alone, is_causal=case.causal, key_padding_mask=doc_mask)
        doc_out.backward(dout[:, start:stop])
        for name, value in zip(pieces, (doc_out, *(x.grad for x in alone))):
            pieces[name].append(value)
    limit_out, limit_grad = TOLERANCES[torch.float64]
    for name, value in zip(pieces, (out, *(x.grad for x in packed))):
        error = relative_error(value, torch.cat(pieces[name], 1))
        assert error <= (limit_out if name == "out" else limit_grad), f"{impl.name} {case} {name}: {error}"


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_matches_reference(kernel, case):
    """Each kernel backend forced through the dilated engine (the CPU ones run here)."""
    backend = ring_core.get_registry().kernels[kernel]
    request = ring_core.KernelRequest("cpu", torch.float64, 8, 4, 4, causal=True, has_mask=True)
    if backend.not_supported_reasons(request):
        pytest.skip(f"{kernel}: {backend.not_supported_reasons(request)}")
    attn = ring_core.DilatedAttention(**case.config, kernel=kernel)
    result = check_attention(attn, case, torch.float64, seed=3)
    assert result.passed, f"{kernel} {case}: {result.errors}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_dense_equals_sdpa(impl):
    """SPEC.md: segment_lengths=[w >= N], rates [1] is exactly SDPA (causal too)."""
    q, k, v = (torch.randn(2, 21, 3, 8, dtype=torch.float64) for _ in range(3))
    attn = ring_core.create_attention(impl.name, segment_lengths=[32], dilation_rates=[1], **impl.options)
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)
        torch.testing.assert_close(attn(q, k, v, is_causal=causal), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_fully_padded_rows_give_zero(impl):
    """A query whose keys are all padding (here: every key of its segment) outputs 0, gradient 0."""
    q, k, v = (torch.randn(1, 8, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 8, dtype=torch.bool)
    mask[:, :4] = True  # first segment of 4 has only padding
    attn = ring_core.create_attention(impl.name, segment_lengths=[4], dilation_rates=[1], **impl.options)
    out = attn(q, k, v, key_padding_mask=mask)
    assert torch.isfinite(out).all()
    assert out[:, :4].abs().max() == 0
    out.sum().backward()
    assert q.grad[:, :4].abs().max() == 0
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
