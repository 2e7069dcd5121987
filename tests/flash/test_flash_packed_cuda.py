"""Packed documents and sliding windows on a CUDA GPU: the kernels' own windows and varlen calls, exact.

Each kernel that takes windows natively against the math kernel (same block, same window,
as a mask), and ``ring_dilated_flash`` with ``cu_seqlens`` and ``window_size`` (the varlen
path where the kernel has one) against the float64 reference, in bf16 and fp16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ring_core
from ring_core.plugin import MathKernel, window_mask
from ring_core.testing import Case, check_attention, packed_documents, relative_error
from ring_flash.kernels import all_kernels

pytestmark = pytest.mark.cuda

WINDOWED = [k.name for k in all_kernels() if k.supports_window]


@pytest.mark.parametrize("name", WINDOWED)
@pytest.mark.parametrize("window", [(17, 0), (5, 9), (-1, 3), (40, 2)], ids=str)
@pytest.mark.parametrize("shape", [(96, 96), (64, 150)], ids=["square", "more-keys"])
def test_native_window_matches_the_mask(name, window, shape):
    """Bottom-right aligned windows (our blocks' convention): forward and backward with a foreign out/lse."""
    n, m = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, n, 4, 64, device="cuda", generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, m, 4, 64, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(2))
    request = ring_core.KernelRequest.for_tensors(q, k, window=True)
    backend = ring_core.get_registry().kernels[name]
    if backend.not_supported_reasons(request):
        pytest.skip(f"{name}: {backend.not_supported_reasons(request)}")
    scale = 64**-0.5
    mask = window_mask(n, m, window, q.device)
    out, lse = backend.forward(q, k, v, scale=scale, window=window)
    ref_out, ref_lse = MathKernel().forward(q, k, v, scale=scale, mask=mask)
    assert relative_error(out.float(), ref_out.float()) < 1e-2
    assert relative_error(lse.float(), ref_lse.float()) < 1e-3
    dout = torch.randn_like(out)
    grads = backend.backward(dout, q, k, v, ref_out, ref_lse, scale=scale, window=window)
    ref_grads = MathKernel().backward(dout, q, k, v, ref_out, ref_lse, scale=scale, mask=mask)
    for grad, ref in zip(grads, ref_grads):
        assert relative_error(grad.float(), ref.float()) < 2e-2


CASES = (
    Case("packed-dense-causal", 1000, 8, (1024,), (1,), head_dim=64, batch=1, causal=True,
         documents=packed_documents(1000, 9, 1)),
    Case("packed-dilated-gqa", 1024, 8, (64, 128, 256), (1, 2, 4), kv_heads=2, head_dim=64, batch=1,
         documents=packed_documents(1024, 7, 2)),
    Case("window-causal", 1024, 8, (1024,), (1,), head_dim=64, batch=1, causal=True, window_size=(100, 0)),
    Case("packed-window-dilated", 1024, 8, (128, 256), (1, 2), head_dim=64, batch=1, causal=True,
         window_size=(60, -1), documents=packed_documents(1024, 6, 3)),
)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_ring_dilated_flash_matches_reference(case, dtype):
    attn = ring_core.create_attention("ring_dilated_flash", **case.config)
    result = check_attention(attn, case, dtype, device="cuda")
    assert result.passed, f"{case} {dtype} ({attn.last_path}): {result.errors} > {result.tolerance}"
    if case.documents is not None:
        assert attn.last_path.startswith("varlen"), attn.last_path


def test_padding_with_documents_takes_the_segments():
    case = dataclasses.replace(CASES[1], padding=True)
    attn = ring_core.create_attention("ring_dilated_flash", **case.config)
    result = check_attention(attn, case, torch.bfloat16, device="cuda")
    assert result.passed and attn.last_path.startswith("segments"), (attn.last_path, result.errors)
