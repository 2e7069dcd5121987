"""Every bad input gets a clear error naming the parameter, before any work starts."""

from __future__ import annotations

import pytest
import torch

import ring_core
from ring_core import DilatedAttention, dilated_attention


def qkv(b=1, n=8, h=2, d=4, hk=None, dtype=torch.float32):
    return (
        torch.randn(b, n, h, d, dtype=dtype),
        torch.randn(b, n, hk or h, d, dtype=dtype),
        torch.randn(b, n, hk or h, d, dtype=dtype),
    )


@pytest.mark.parametrize(
    ("segments", "rates", "merge", "error", "match"),
    [
        ([8, 4], [1, 1], "lse", ValueError, r"segment_lengths must be strictly increasing, got \[8, 4\]"),
        ([4, 4], [1, 1], "lse", ValueError, "strictly increasing"),
        ([0, 4], [1, 1], "lse", ValueError, r"segment_lengths must be positive, got \[0, 4\]"),
        ([4, 8], [1], "lse", ValueError, "same length, got 2 .* and 1"),
        ([4, 8], [1, 3], "lse", ValueError, r"multiple of its dilation rate.*\(8 % 3 != 0\)"),
        ([4, 8], [1, 0], "lse", ValueError, r"dilation_rates must be >= 1, got \[1, 0\]"),
        ([], [], "lse", ValueError, "segment_lengths must not be empty"),
        ([4.0], [1], "lse", TypeError, "segment_lengths must hold ints"),
        ("48", [1], "lse", TypeError, "segment_lengths must be a sequence of ints"),
        ([4], [1], "mean", ValueError, r"merge must be one of \['lse', 'head_groups'\], got 'mean'"),
    ],
)
def test_bad_config(segments, rates, merge, error, match):
    with pytest.raises(error, match=match):
        DilatedAttention(segments, rates, merge=merge)
    with pytest.raises(error, match=match):
        dilated_attention(*qkv(), segment_lengths=segments, dilation_rates=rates, merge=merge)


def test_bad_dropout():
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got 1.5"):
        DilatedAttention([4], [1], dropout=1.5)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: (torch.randn(8, 2, 4), *qkv()[1:]),
            ValueError,
            r"q must have 4 dims \(B, N, H, D\), got shape \(8, 2, 4\)",
        ),
        (lambda: (*qkv()[:2], torch.randn(1, 8, 2)), ValueError, "v must have 4 dims"),
        (
            lambda: qkv(dtype=torch.int64) if False else tuple(x.long() for x in qkv()),
            TypeError,
            "q must be a floating-point tensor .* got int64",
        ),
        (
            lambda: (qkv()[0].double(), *qkv()[1:]),
            TypeError,
            "q, k, v must share one dtype, got float64, float32, float32",
        ),
        (lambda: (torch.randn(2, 8, 2, 4), *qkv()[1:]), ValueError, "batch size, got 2, 1, 1"),
        (lambda: (torch.randn(1, 9, 2, 4), *qkv()[1:]), ValueError, "same sequence length here, got 9 and 8"),
        (
            lambda: (qkv()[0], torch.randn(1, 7, 2, 4), qkv()[2]),
            ValueError,
            "k and v must share the sequence length, got 7 and 8",
        ),
        (lambda: (torch.randn(1, 8, 2, 8), *qkv()[1:]), ValueError, "share the head dim, got 8 and 4"),
        (lambda: qkv(h=3, hk=2), ValueError, r"multiple of the key/value heads \(GQA\), got 3 and 2"),
        (
            lambda: (qkv()[0], qkv(h=1)[1], qkv()[2]),
            ValueError,
            "k and v must have the same number of heads, got 1 and 2",
        ),
    ],
)
def test_bad_tensors(make, error, match):
    with pytest.raises(error, match=match):
        dilated_attention(*make(), segment_lengths=[4], dilation_rates=[1])


def test_bad_key_padding_mask():
    q, k, v = qkv()
    attn = DilatedAttention([4], [1])
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor .* got float32"):
        attn(q, k, v, key_padding_mask=torch.zeros(1, 8))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, N\) = \(1, 8\), got \(1, 7\)"):
        attn(q, k, v, key_padding_mask=torch.zeros(1, 7, dtype=torch.bool))


def test_head_groups_needs_a_head_per_branch():
    with pytest.raises(ValueError, match="num_heads=2 < 3 branches"):
        dilated_attention(*qkv(h=2), segment_lengths=[2, 4, 8], dilation_rates=[1, 1, 1], merge="head_groups")


def test_errors_before_any_kernel_call(monkeypatch):
    """Validation runs before dispatch: a bad input never reaches a kernel."""
    called = []
    monkeypatch.setattr(ring_core.CPUFlashKernel, "forward", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError):
        dilated_attention(*qkv(h=3, hk=2), segment_lengths=[4], dilation_rates=[1])
    assert not called


def test_validate_inputs_on_one_process_runs_the_local_checks_without_a_collective():
    """One process: ``check_qkv`` then ``cu_seqlens`` against this rank's N, their errors as they are, and no
    communicator asked for; the checked document boundaries come back for the op."""
    from ring_core.plugin import validate_inputs

    def no_comms():
        raise AssertionError("one process needs no communicator")

    q, k, v = qkv(n=8)
    assert validate_inputs(q, k, v, None, world_size=1, comms=no_comms) is None
    documents = validate_inputs(q, k, v, None, world_size=1, comms=no_comms, cu_seqlens=torch.tensor([0, 3, 8]))
    assert documents == (0, 3, 8)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        validate_inputs(q[0], k, v, None, world_size=1, comms=no_comms, cu_seqlens=torch.tensor([0, 3, 7]))
    with pytest.raises(ValueError, match="cu_seqlens must end at N=8"):
        validate_inputs(q, k, v, None, world_size=1, comms=no_comms, cu_seqlens=torch.tensor([0, 3, 7]))
