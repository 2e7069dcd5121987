"""The custom ops of ``ring_core.ops``: PyTorch's own checks of them, copies of their owners, the errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import ring_core
from ring_core.ops import run_attention

CONFIG = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}


def qkv(requires_grad: bool = True):
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(2, 10, 4, 8, generator=generator, dtype=torch.float64).requires_grad_(requires_grad)
        for _ in range(3)
    ]


def test_torch_library_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch, as torch.library checks them."""
    attn = ring_core.create_attention("ring_dilated", **CONFIG)
    q, k, v = qkv()
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 3] = True
    for causal, lse_grad in ((False, False), (True, True)):
        args = (q, k, v, mask, None, None, attn._op.name, causal, 0.0, lse_grad)
        torch.library.opcheck(torch.ops.ring_attention.attention.default, args)
    cu_seqlens = torch.tensor([0, 4, 4, 10])  # packed documents: a batch of one
    args = (q[:1], k[:1], v[:1], None, cu_seqlens, None, attn._op.name, True, 0.0, True)
    torch.library.opcheck(torch.ops.ring_attention.attention.default, args)


def test_copies_and_pickles_compute_alike_with_their_own_ops():
    attn = ring_core.create_attention("ring_dilated", **CONFIG)
    q, k, v = qkv(requires_grad=False)
    expected = attn(q, k, v, is_causal=True)
    for twin in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn))):
        assert twin._op.name != attn._op.name and twin._op.owner is twin
        torch.testing.assert_close(twin(q, k, v, is_causal=True), expected, rtol=0, atol=0)


def test_no_double_backward():
    q, k, v = qkv()
    out = ring_core.dilated_attention(q, k, v, **CONFIG)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        dq.sum().backward()


def test_an_unknown_op_is_a_clear_error():
    q, k, v = qkv(requires_grad=False)
    with pytest.raises(RuntimeError, match="does not exist"):
        run_attention("nothing#0", q, k, v)
