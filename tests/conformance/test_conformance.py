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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("where", ["q", "k"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_nan_in_is_nan_out(impl, where, dtype):
    """A NaN in a query (or a key) gives NaN in exactly the output rows that see it (that query's rows, the rows of
    the queries that see that key), as in SDPA; short segments (4 keys here) once sent it through a fused CPU
    kernel that returned 0 instead."""
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 16, 2, 4, generator=generator, dtype=torch.float64).to(dtype) for _ in range(3))
    position = 5
    {"q": q, "k": k}[where][1, position, 0, 2] = float("nan")
    config = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
    out = ring_core.create_attention(impl.name, **config, **impl.options)(q, k, v)
    sees = ring_core.branch_counts(16, 2, **config)[0] > 0  # head 0: sees[t, s], query t sees key s
    expected = torch.zeros(2, 16, 2, dtype=torch.bool)
    expected[1, :, 0] = sees[:, position] if where == "k" else torch.arange(16) == position
    assert torch.equal(torch.isnan(out).any(-1), expected), f"{impl.name}: NaN rows {torch.isnan(out).any(-1)}"


def _double_backward(module, *inputs, **kwargs):
    """First-order gradients with ``create_graph=True`` (must stay exact), then the refused second order."""
    first = module(*inputs, **kwargs)
    first = first[0] if isinstance(first, tuple) else first
    expected = torch.autograd.grad(first.pow(2).sum(), inputs[0])[0]
    out = module(*inputs, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(out.pow(2).sum(), inputs[0], create_graph=True)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="has no double backward"):
        grad.pow(2).sum().backward()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_double_backward_is_refused_clearly(impl):
    """Gradients of gradients (create_graph=True) were silently wrong with the math kernel: refused, while the
    first-order gradients under create_graph=True stay exact."""
    q, k, v = (torch.randn(1, 12, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attn = ring_core.create_attention(impl.name, segment_lengths=[4, 8], dilation_rates=[1, 2], **impl.options)
    _double_backward(attn, q, k, v, is_causal=True)


@pytest.mark.parametrize("kernel", ["math", "cpu_flash"])
def test_double_backward_is_refused_with_every_cpu_kernel(kernel):
    q, k, v = (torch.randn(1, 12, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _double_backward(ring_core.DilatedAttention([16], [1], kernel=kernel), q, k, v)


@pytest.mark.parametrize("impl", ring_core.list_implementations("multihead"), ids=lambda i: i.name)
def test_multihead_double_backward_is_refused_clearly(impl):
    x = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    attn = ring_core.create_multihead_attention(
        impl.name, embed_dim=8, num_heads=2, segment_lengths=[16], dilation_rates=[1], batch_first=True,
        dtype=torch.float64,
    )  # fmt: skip
    _double_backward(lambda x: attn(x, x, x, need_weights=False), x)


INFERENCE_CASES = [c for c in PACKED_CASES if c.documents] + [c for c in CASES if c.padding][:1]


@pytest.mark.parametrize("case", INFERENCE_CASES, ids=str)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_inference_mode_equals_no_grad(impl, case):
    """Under ``torch.inference_mode`` (inputs, padding and ``cu_seqlens`` made there too: tensors that count no
    versions), twice, the same result as under ``no_grad``."""
    q, k, v, mask = make_inputs(case, torch.float64, seed=5)
    attn = build(impl, case)
    with torch.no_grad():
        expected = attn(q, k, v, is_causal=case.causal, key_padding_mask=mask, **case.forward_options())
    for _ in range(2):
        with torch.inference_mode():
            inputs = [None if x is None else x.clone() for x in (q, k, v, mask)]
            got = attn(*inputs[:3], is_causal=case.causal, key_padding_mask=inputs[3], **case.forward_options())
        assert relative_error(got, expected) <= 1e-12, f"{impl.name} {case}"


@pytest.mark.parametrize("impl", ring_core.list_implementations("multihead"), ids=lambda i: i.name)
def test_multihead_inference_mode_equals_no_grad(impl):
    """The drop-ins under ``torch.inference_mode`` with packed documents, as under ``no_grad``."""
    torch.manual_seed(0)
    attn = ring_core.create_multihead_attention(
        impl.name, embed_dim=8, num_heads=2, segment_lengths=[4, 8], dilation_rates=[1, 2], batch_first=True,
        dtype=torch.float64,
    ).eval()  # fmt: skip
    x = torch.randn(1, 19, 8, dtype=torch.float64)
    with torch.no_grad():
        expected, _ = attn(x, x, x, need_weights=False, cu_seqlens=torch.tensor([0, 6, 19]))
    with torch.inference_mode():
        got, _ = attn(x.clone(), x.clone(), x.clone(), need_weights=False, cu_seqlens=torch.tensor([0, 6, 19]))
    assert relative_error(got, expected) <= 1e-12


def _strided_last_dim(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a view whose head dim has stride 2 (every other element of a wider tensor)."""
    return torch.stack([x, torch.full_like(x, float("nan"))], -1).flatten(-2)[..., ::2]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_inputs_with_a_strided_head_dim(impl):
    """Views whose last dim is not packed (stride 2 here) once gave silently wrong results through cpu_flash."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 12, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    config = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
    leaves = [_strided_last_dim(x).requires_grad_() for x in (q, k, v)]
    assert all(x.stride(-1) == 2 for x in leaves)
    out = ring_core.create_attention(impl.name, **config, **impl.options)(*leaves, is_causal=True)
    out.backward(torch.ones_like(out))
    reference = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = ring_core.reference_attention(*reference, **config, is_causal=True)
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for leaf, ref in zip(leaves, reference):
        torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_cuda_kernel_takes_a_strided_head_dim(kernel):
    q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    backend = ring_core.get_registry().kernels[kernel]
    if backend.not_supported_reasons(ring_core.KernelRequest.for_tensors(q, k, causal=True)):
        pytest.skip(f"{kernel} cannot run this request here")
    out = ring_core.DilatedAttention([64], [1], kernel=kernel)(
        *(_strided_last_dim(x) for x in (q, k, v)), is_causal=True
    )
    expected = ring_core.reference_attention(*(x.double().cpu() for x in (q, k, v)), is_causal=True)
    assert relative_error(out, expected) <= TOLERANCES[torch.bfloat16][0], kernel


def test_block_sparse_strips_refuse_double_backward():
    """The strip path (its own autograd Function; here on its CPU twin) refuses double backward too."""
    blocksparse = pytest.importorskip("ring_blocksparse")
    q, k, v = (torch.randn(1, 32, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attn = blocksparse.BlockSparseRingDilatedAttention(
        [32], [1], block_size=8, method="flex", pattern="strided", stride=16
    )
    attn.sparse_kernel = "math"
    _double_backward(attn, q, k, v)
    assert attn.last_method == "flex"
