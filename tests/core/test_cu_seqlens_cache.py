"""A ``cu_seqlens`` tensor handed to many calls (every layer of a model) is read to the host once while it is
unchanged: each read of a CUDA tensor waits for the GPU. Edited in place, replaced by another tensor, or made under
``torch.inference_mode`` (no version to trust), it is read again, and every result follows its values."""

from __future__ import annotations

import torch

from distributed_helpers import host_reads
from ring_core import DilatedAttention, reference_attention

CONFIG = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
N = 24


def _inputs() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(1, N, 2, 4, generator=generator, dtype=torch.float64) for _ in range(3)]


def _expected(documents: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    q, k, v = (x.requires_grad_() for x in _inputs())
    out = reference_attention(q, k, v, **CONFIG, is_causal=True, cu_seqlens=torch.tensor(documents))
    out.sum().backward()
    return out.detach(), [x.grad for x in (q, k, v)]


def _calls(attn: DilatedAttention, cu_seqlens: torch.Tensor, count: int) -> tuple[int, list]:
    """``count`` forward+backward calls with ``cu_seqlens``: how often it was read, and each call's results."""
    cu_seqlens._counted = True
    results = []
    with host_reads() as reads:
        for _ in range(count):
            q, k, v = (x.requires_grad_() for x in _inputs())
            out = attn(q, k, v, is_causal=True, cu_seqlens=cu_seqlens)
            out.sum().backward()
            results.append((out.detach(), [x.grad for x in (q, k, v)]))
    return len(reads), results


def _assert_equal(results: list, expected: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    for out, grads in results:
        torch.testing.assert_close(out, expected[0], rtol=1e-10, atol=1e-12)
        for grad, ref in zip(grads, expected[1]):
            torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-11)


def test_one_tensor_is_read_once_across_calls_and_again_when_edited():
    attn = DilatedAttention(**CONFIG)
    before, after = _expected((0, 7, 16, 24)), _expected((0, 11, 16, 24))  # (first: they read tensors of their own)
    cu_seqlens = torch.tensor([0, 7, 16, 24], dtype=torch.int32)
    reads, results = _calls(attn, cu_seqlens, 3)
    assert reads == 1
    _assert_equal(results, before)
    cu_seqlens[1] = 11  # in place: other documents
    reads, results = _calls(attn, cu_seqlens, 2)
    assert reads == 1
    _assert_equal(results, after)
    reads, results = _calls(attn, torch.tensor([0, 11, 16, 24]), 1)  # another tensor of the same values
    assert reads == 1
    _assert_equal(results, after)


def test_an_inference_tensor_is_read_every_call():
    """Under ``torch.inference_mode`` (an evaluation loop), forward only."""
    attn = DilatedAttention(**CONFIG)
    expected, _ = _expected((0, 7, 16, 24))
    with torch.inference_mode():
        cu_seqlens = torch.tensor([0, 7, 16, 24])
        cu_seqlens._counted = True
        with host_reads() as reads:
            outs = [attn(*_inputs(), is_causal=True, cu_seqlens=cu_seqlens) for _ in range(2)]
    assert len(reads) == 2
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_a_bad_tensor_is_never_kept():
    """Values that fail the checks raise on every call (nothing read is kept for them as checked)."""
    attn = DilatedAttention(**CONFIG)
    cu_seqlens = torch.tensor([0, 16, 7, 24])
    q, k, v = _inputs()
    for _ in range(2):
        try:
            attn(q, k, v, cu_seqlens=cu_seqlens)
        except ValueError as error:
            assert "non-decreasing" in str(error)
        else:
            raise AssertionError("a decreasing cu_seqlens was accepted")
