"""Packed documents and sliding windows on a CUDA GPU: the kernels' own windows and varlen calls, exact.

Each kernel that takes windows natively against the math kernel (same block, same window,
as a mask), and ``ring_dilated_flash`` with ``cu_seqlens`` and ``window_size`` (the varlen
path where the kernel has one) against the float64 reference, in bf16 and fp16.
"""

from __future__ import annotations

import dataclasses
import itertools

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


VARLEN = [k.name for k in all_kernels() if k.supports_varlen]
# Query and key lengths of the packed segments: odd ones, an empty one, more keys than queries (bottom-right).
LAYOUTS = {
    "odd": ([37, 1, 150, 64, 9], [37, 1, 150, 64, 9]),
    "with-empty": ([37, 0, 150, 9], [37, 0, 150, 9]),
    "more-keys": ([37, 1, 150, 9], [50, 1, 191, 30]),
}
MODES = {"dense": (False, None), "causal": (True, None), "window": (False, (17, 0)),
         "window-two-sided": (False, (5, 9)), "window-right": (False, (-1, 3))}  # fmt: skip


def _per_segment(fn, lengths_q, lengths_k, rows, keys) -> list:
    """``fn(n, m, *rows, *keys)`` on each segment alone: ``rows`` cut by the query lengths, ``keys`` by the key ones."""
    bounds_q, bounds_k = (list(itertools.accumulate(x, initial=0)) for x in (lengths_q, lengths_k))
    return [
        fn(q1 - q0, k1 - k0, *(x[q0:q1] for x in rows), *(x[k0:k1] for x in keys))
        for q0, q1, k0, k1 in zip(bounds_q, bounds_q[1:], bounds_k, bounds_k[1:])
    ]


@pytest.mark.parametrize("name", VARLEN)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_native_varlen_matches_each_segment(name, layout, mode, kv_heads):
    """Packed segments in one call against the float64 math kernel on each segment alone (causality and windows
    bottom-right aligned per segment), forward and backward with a foreign out/lse."""
    lengths_q, lengths_k = LAYOUTS[layout]
    causal, window = MODES[mode]
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, dout = (torch.randn(sum(lengths_q), 4, 64, device="cuda", generator=gen).to(torch.bfloat16) for _ in "qo")
    k, v = (torch.randn(sum(lengths_k), kv_heads, 64, device="cuda", generator=gen).to(torch.bfloat16) for _ in "kv")
    backend = ring_core.get_registry().kernels[name]
    request = ring_core.KernelRequest.for_tensors(q, k, causal=causal, window=window is not None, varlen=True)
    if backend.not_supported_reasons(request):
        pytest.skip(f"{name}: {backend.not_supported_reasons(request)}")
    scale = 64**-0.5
    segment_window = (-1 if window is None else window[0], 0) if causal else window  # causal as flash-attn's
    math = MathKernel()

    def mask(n, m):
        return None if segment_window is None else window_mask(n, m, segment_window, "cuda")

    def forward(n, m, q, k, v):
        out, lse = math.forward(q[None], k[None], v[None], scale=scale, mask=mask(n, m))
        return out[0], lse[0].transpose(0, 1)

    def backward(n, m, q, dout, out, lse, k, v):
        grads = math.backward(dout[None], q[None], k[None], v[None], out[None], lse.transpose(0, 1)[None],
                              scale=scale, mask=mask(n, m))  # fmt: skip
        return [g[0] for g in grads]

    f64 = [x.double() for x in (q, dout, k, v)]
    ref = _per_segment(forward, lengths_q, lengths_k, f64[:1], f64[2:])
    ref_out = torch.cat([o for o, _ in ref]).to(torch.bfloat16)  # the final out/lse a backward gets: bf16, float32
    ref_lse = torch.cat([lse for _, lse in ref]).float()  # (total, H)
    cu_q, cu_k = (torch.tensor(list(itertools.accumulate(x, initial=0)), dtype=torch.int32, device="cuda")
                  for x in (lengths_q, lengths_k))  # fmt: skip
    sizes = (max(lengths_q), max(lengths_k))
    out, lse = backend.forward_varlen(q, k, v, cu_q, cu_k, *sizes, scale=scale, causal=causal, window=window)
    assert out.shape == q.shape and lse.shape == (4, q.shape[0])
    assert relative_error(out.float(), ref_out.float()) < 1e-2
    assert relative_error(lse.float(), ref_lse.transpose(0, 1)) < 1e-3
    grads = backend.backward_varlen(dout, q, k, v, ref_out, ref_lse.transpose(0, 1), cu_q, cu_k, *sizes,
                                    scale=scale, causal=causal, window=window)  # fmt: skip
    rows = [f64[0], f64[1], ref_out.double(), ref_lse.double()]
    ref_grads = _per_segment(backward, lengths_q, lengths_k, rows, f64[2:])
    for i, (grad, x) in enumerate(zip(grads, (q, k, v))):
        reference = torch.cat([g[i] for g in ref_grads])
        assert grad.shape == x.shape
        assert relative_error(grad.float(), reference) < 2e-2, ("dq", "dk", "dv")[i]


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
