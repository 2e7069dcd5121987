"""flash-attn 4 on a GPU: the conformance cases in bf16 against float64, through the engine and the fused path.

Forward and backward (``check_attention`` compares the output and every gradient with the
float64 reference of SPEC.md: bf16 within 1e-2 / 2e-2, output no worse than 2x SDPA's error),
grouped-query and causal included. Skips where flash-attn 4 is not installed (its wheels do
not come with the project: ``tools/gpu/fa4_wheels.sh`` brings them to a GPU machine).
"""

from __future__ import annotations

import pytest
import torch

import ring_core
from ring_core.testing import (
    CASES,
    TOLERANCES,
    Case,
    check_attention,
    make_inputs,
    packed_documents,
    reference_outputs,
    relative_error,
)
from ring_flash import RingDilatedAttentionFlash

pytestmark = pytest.mark.cuda

# The conformance cases (head dim 8) and the head dims models use, odd lengths and GQA included.
FA4_CASES = (
    *(c for c in CASES if not c.padding),
    Case("d128-dilated-odd-n", 300, 4, (64, 128, 256), (1, 2, 4), head_dim=128, batch=1),
    Case("d128-causal-gqa", 256, 8, (64, 256), (1, 2), head_dim=128, batch=1, kv_heads=2, causal=True),
    Case("d64-dense-causal", 200, 4, (256,), (1,), head_dim=64, causal=True),
)


# Packed documents (one varlen call per branch offset, an empty document in each) and sliding windows, through
# ring-flash's single-device path; odd lengths, GQA, the head dims models use.
FA4_PACKED_CASES = (
    Case("packed-dense-causal", 999, 8, (1024,), (1,), head_dim=128, batch=1, causal=True,
         documents=packed_documents(999, 9, 21)),
    Case("packed-dilated-gqa", 1000, 8, (64, 128, 256), (1, 2, 4), kv_heads=2, head_dim=64, batch=1,
         documents=packed_documents(1000, 7, 22)),
    Case("packed-window-two-sided", 777, 4, (1024,), (1,), head_dim=64, batch=1, window_size=(33, 17),
         documents=packed_documents(777, 6, 23)),
    Case("window-causal", 1000, 8, (1024,), (1,), head_dim=64, batch=1, causal=True, window_size=(100, 0)),
    Case("packed-window-dilated", 1024, 8, (128, 256), (1, 2), head_dim=64, batch=1, causal=True,
         window_size=(60, -1), documents=packed_documents(1024, 6, 24)),
)  # fmt: skip


@pytest.fixture(scope="module")
def fa4():
    backend = ring_core.get_registry().kernels["flash_attn4"]
    reasons = backend.availability_reasons()
    if reasons:
        pytest.skip("flash_attn4: " + "; ".join(reasons))
    return backend


def sdpa_error(case: Case, seed: int) -> float:
    """Relative output error of plain SDPA in bf16 (dense, same sizes) against the float64 reference."""
    dense = Case("dense", case.seq_len, case.heads, (case.seq_len,), (1,), head_dim=case.head_dim, batch=case.batch,
                 causal=case.causal)  # fmt: skip
    q, k, v, _ = make_inputs(dense, torch.bfloat16, "cuda", seed=seed)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=case.causal
    ).transpose(1, 2)
    ref = reference_outputs(dense, q, k, v, None, torch.zeros(out.shape, dtype=torch.float64))["out"]
    return relative_error(out, ref)


@pytest.mark.parametrize("path", ["engine", "fused"])
@pytest.mark.parametrize("case", FA4_CASES, ids=str)
def test_flash_attn4_matches_the_reference(fa4, case, path):
    if path == "engine":  # core's blockwise engine: GQA heads reach the kernel as they are
        attn = ring_core.DilatedAttention(**case.config, kernel="flash_attn4")
    else:  # ring-flash's fused single-device path
        attn = RingDilatedAttentionFlash(**case.config, kernel="flash_attn4")
    result = check_attention(attn, case, torch.bfloat16, device="cuda", seed=11)
    assert result.passed, (path, result.errors, result.tolerance)
    assert result.errors["out"] <= max(2 * sdpa_error(case, 11), TOLERANCES[torch.bfloat16][0] / 10), result.errors


def test_flash_attn4_backward_with_rows_that_see_nothing(fa4):
    """An lse of -inf (a row that sees no key anywhere) gives zero gradients, not NaN."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, dout = (torch.randn(1, 64, 2, 64, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(4))
    out, lse = fa4.forward(q, k, v, scale=0.125)
    lse = lse.clone()
    lse[:, :, :5] = float("-inf")
    out = out.clone()
    out[:, :5] = 0
    dq, dk, dv = fa4.backward(dout, q, k, v, out, lse, scale=0.125)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert dq[:, :5].abs().max() == 0


@pytest.mark.parametrize("path", ["engine", "fused"])
@pytest.mark.parametrize("case", [c for c in FA4_CASES if c.head_dim == 128], ids=str)
def test_tuned_dispatch_matches_the_reference(case, path):
    """``tuned`` (each block on the kernel its measured row names) where this card has a table."""
    tuned = ring_core.get_registry().kernels["tuned"]
    kv_heads = case.kv_heads or case.heads if path == "engine" else case.heads
    request = ring_core.KernelRequest("cuda", torch.bfloat16, case.head_dim, case.heads, kv_heads, causal=case.causal,
                                      compute_capability=torch.cuda.get_device_capability())  # fmt: skip
    reasons = tuned.not_supported_reasons(request)
    if reasons:
        pytest.skip("tuned: " + "; ".join(reasons))
    if path == "engine":
        attn = ring_core.DilatedAttention(**case.config, kernel="tuned")
    else:
        attn = RingDilatedAttentionFlash(**case.config, kernel="tuned")
    result = check_attention(attn, case, torch.bfloat16, device="cuda", seed=12)
    assert result.passed, (path, result.errors, result.tolerance)


@pytest.mark.parametrize("case", FA4_PACKED_CASES, ids=str)
def test_flash_attn4_packed_and_windowed_match_the_reference(fa4, case):
    """flash-attn 4's varlen calls (packed documents) and windows, forward and backward, against float64."""
    attn = RingDilatedAttentionFlash(**case.config, kernel="flash_attn4")
    result = check_attention(attn, case, torch.bfloat16, device="cuda", seed=13)
    assert result.passed, (attn.last_path, result.errors, result.tolerance)
    expected = "varlen flash_attn4" if case.documents is not None else "segments flash_attn4"
    assert attn.last_path.startswith(expected), attn.last_path
