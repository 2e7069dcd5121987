"""ring-core on a CUDA GPU (core kernels only): run with nox -s "tests(cuda)" on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import ring_core
from ring_core.testing import CASES, TOLERANCES, check_attention, make_inputs, reference_outputs, relative_error

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_dilated_on_cuda_matches_reference(case, dtype):
    attn = ring_core.DilatedAttention(**case.config, kernel="math")
    result = check_attention(attn, case, dtype, device="cuda", seed=11)
    assert result.passed, result.errors


@pytest.mark.parametrize("case", CASES[:4], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_on_cuda_within_spec_and_sdpa(case, dtype):
    """bf16/fp16: within 1e-2 / 2e-2 of the float64 reference and no worse than 2x SDPA's error (dense)."""
    attn = ring_core.DilatedAttention(**case.config)
    result = check_attention(attn, case, dtype, device="cuda", seed=5)
    assert result.passed, result.errors
    if case.segment_lengths[0] >= case.seq_len and case.kv_heads is None and not case.padding:
        q, k, v, _ = make_inputs(case, dtype, "cuda", seed=5)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=case.causal
        ).transpose(1, 2)
        dout = torch.zeros(sdpa.shape, dtype=torch.float64)
        ref = reference_outputs(case, q, k, v, None, dout)["out"]
        assert result.errors["out"] <= max(2 * relative_error(sdpa, ref), TOLERANCES[dtype][0] / 10)
