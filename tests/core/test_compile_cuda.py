"""``torch.compile(fullgraph=True)`` with Inductor on one CUDA GPU, bf16: run with nox -s "tests(cuda)".

The CPU tests (``test_compile.py``) check every implementation in float64 with ``aot_eager``;
here the fast kernels run inside the op and Inductor generates the code around it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ring_core

pytestmark = pytest.mark.cuda

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]
CONFIG = {"segment_lengths": [128, 256], "dilation_rates": [1, 2]}
B, N, H, D = 2, 512, 8, 64


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run(module, inputs, **kwargs):
    """Output and the gradients of ``inputs`` for a fixed upstream gradient."""
    out = module(*inputs, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    upstream = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view(out.shape)
    return [out, *torch.autograd.grad(out, inputs, upstream)]


def check(module, inputs, *, exact=None, **kwargs):
    """Zero graph breaks; compiled equals eager, or (``exact``: a float64 copy of ``module``) is as
    close to the float64 result as eager is (Inductor fuses the bf16 ops around the attention, so
    a whole layer's rounding differs from eager's)."""
    explanation = torch._dynamo.explain(module)(*inputs, **kwargs)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(module, fullgraph=True)
    results = [run(compiled, inputs, **kwargs), run(module, inputs, **kwargs)]
    if exact is not None:
        results.append(run(exact, [x.detach().double().requires_grad_() for x in inputs], **kwargs))
    for a, b, *c in zip(*results):
        assert torch.isfinite(a).all()
        if c:
            assert relative_error(a, c[0]) <= 2 * relative_error(b, c[0]) + 1e-3
        else:
            assert relative_error(a, b) < 1e-2


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_compiled_on_cuda(impl):
    attn = ring_core.create_attention(impl.name, **CONFIG, **(impl.bench_options or impl.options))
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(B, N, H // 2, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    check(attn, (q, k, v), is_causal=True)


def test_block_sparse_compiles_on_the_strips():
    """Compiled, 'auto' takes the strips (one op; its backward recomputes each FlexAttention call)."""
    blocksparse = pytest.importorskip("ring_blocksparse")
    attn = blocksparse.BlockSparseRingDilatedAttention([N], [1], block_size=128, pattern="local_window", window=256)
    inputs = [torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    check(attn, inputs, is_causal=True)
    assert attn.last_method == "flex"


def test_transformer_encoder_layer_on_cuda():
    multihead = pytest.importorskip("ring_multihead")
    layer = nn.TransformerEncoderLayer(H * D, H, 4 * H * D, dropout=0.0, batch_first=True, device="cuda")
    layer.self_attn = multihead.MultiheadDilatedAttention(H * D, H, batch_first=True, device="cuda", **CONFIG)
    exact = copy.deepcopy(layer).double()
    layer = layer.to(torch.bfloat16)
    x = torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    padding = torch.zeros(B, N, dtype=torch.bool, device="cuda")
    padding[0, -17:] = True
    check(layer, (x,), exact=exact, src_key_padding_mask=padding)
