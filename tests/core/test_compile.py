"""``torch.compile(fullgraph=True)``: every implementation is one op per call and compiles without a graph break.

Each registered implementation (one process, no process group), the multihead modules alone
and inside ``nn.TransformerEncoderLayer``: ``torch._dynamo.explain`` finds one graph and no
break, and the compiled module (``fullgraph=True``: any break would raise) gives eager's
outputs and gradients, float64 on the CPU. ``aot_eager`` runs everything but Inductor's code
generation (the custom ops' fake implementations and autograd included); one test compiles
with Inductor. Compiling is slow: shapes are tiny and each module compiles once or twice.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ring_core

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]
CONFIG = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}
B, N, H, H_KV, D = 2, 12, 4, 2, 8


def build(name: str, **options):
    impl = ring_core.resolve_implementation(name)
    return ring_core.create_attention(impl.name, **CONFIG, **impl.options, **options)


def qkv(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(B, N, H_KV, D, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(B, N, generator=generator) < 0.3
    return [t.requires_grad_() for t in (q, k, v)], mask


def compile_graph(module, *args, **kwargs) -> None:
    """``module(*args, **kwargs)`` traces as one graph without breaks."""
    explanation = torch._dynamo.explain(module)(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def assert_same(compiled, eager, inputs) -> None:
    """Equal results, and equal gradients of a loss that uses every result."""
    compiled, eager = (r if isinstance(r, tuple) else (r,) for r in (compiled, eager))
    losses = []
    for results in (compiled, eager):
        weights = [torch.linspace(-1, 1, r.numel(), dtype=r.dtype).view(r.shape) for r in results]
        loss = sum((torch.where(torch.isinf(r), 0, r) * w).sum() for r, w in zip(results, weights))
        losses.append(torch.autograd.grad(loss, inputs))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(*losses):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_no_graph_break(impl):
    (q, k, v), mask = qkv()
    compile_graph(build(impl.name), q, k, v, is_causal=True, key_padding_mask=mask)


@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_compiled_equals_eager(impl, return_lse):
    """Forward and backward, causal with padding and grouped-query heads; with the lse's gradient too."""
    attn = build(impl.name)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    (q, k, v), mask = qkv(1)
    kwargs = {"is_causal": True, "key_padding_mask": mask, "return_lse": return_lse}
    assert_same(compiled(q, k, v, **kwargs), attn(q, k, v, **kwargs), (q, k, v))


def test_new_shapes_compile_without_break():
    """A second sequence length recompiles (dynamic shapes) and stays one graph: nothing depends on sizes."""
    attn = build("dilated")
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    for n in (12, 20, 28):
        q, k, v = (torch.randn(1, n, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
        assert_same(compiled(q, k, v, is_causal=True), attn(q, k, v, is_causal=True), (q, k, v))


def test_inductor():
    """Inductor's code around the op: same numbers (the op itself is the same eager engine)."""
    attn = build("dilated")
    compiled = torch.compile(attn, fullgraph=True)
    (q, k, v), mask = qkv(2)
    assert_same(compiled(q * 2, k, v, key_padding_mask=mask), attn(q * 2, k, v, key_padding_mask=mask), (q, k, v))


def test_dropout_compiled_is_one_draw_per_call():
    """Dropout's seed is drawn in the graph: compiled calls differ from each other, forward and backward agree."""
    attn = build("dilated", dropout=0.5)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    (q, k, v), _ = qkv(3)
    first, second = compiled(q, k, v), compiled(q, k, v)
    assert not torch.equal(first, second)
    torch.manual_seed(7)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    torch.manual_seed(7)
    expected = attn(q, k, v)  # same generator state: the same seed, so the same dropout mask
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- the multihead modules ------------------------------------------------------------------------------

E, HEADS = 16, 4


def multihead(name: str):
    from ring_multihead import MultiheadDilatedAttention, RingMultiheadDilatedAttention

    cls = {"multihead": MultiheadDilatedAttention, "ring_multihead": RingMultiheadDilatedAttention}[name]
    torch.manual_seed(0)
    return cls(E, HEADS, batch_first=True, dtype=torch.float64, **CONFIG)


@pytest.mark.parametrize("name", ["multihead", "ring_multihead"])
def test_multihead_compiles(name):
    pytest.importorskip("ring_multihead")
    module = multihead(name)
    x = torch.randn(B, N, E, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, N) < 0.3
    kwargs = {"key_padding_mask": mask, "need_weights": False}
    compile_graph(module, x, x, x, **kwargs)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    assert_same(compiled(x, x, x, **kwargs)[0], module(x, x, x, **kwargs)[0], (x, *module.parameters()))


def test_multihead_dense_path_with_documents_compiles():
    """need_weights=True (the dense path) with packed documents: the documents' mask is built from the cu_seqlens
    tensor, not its values on the host (compiling once failed on ``torch.tensor(None)``)."""
    pytest.importorskip("ring_multihead")
    module = multihead("multihead")
    x = torch.randn(1, N, E, dtype=torch.float64, requires_grad=True)
    kwargs = {"cu_seqlens": torch.tensor([0, 5, 5, N]), "need_weights": True}
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    assert_same(compiled(x, x, x, **kwargs), module(x, x, x, **kwargs), (x, *module.parameters()))


def encoder_layer():
    from ring_multihead import MultiheadDilatedAttention

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 2 * E, dropout=0.0, batch_first=True, dtype=torch.float64)
    layer.self_attn = MultiheadDilatedAttention(E, HEADS, batch_first=True, dtype=torch.float64, **CONFIG)
    return layer


def test_inside_transformer_encoder_layer():
    """Training with key padding (the layer turns it into a float mask: checked inside the op) and causal."""
    pytest.importorskip("ring_multihead")
    layer = encoder_layer()
    x = torch.randn(B, N, E, dtype=torch.float64, requires_grad=True)
    padding = torch.rand(B, N) < 0.3
    causal = nn.Transformer.generate_square_subsequent_mask(N, dtype=torch.float64)
    compile_graph(layer, x, src_key_padding_mask=padding)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for kwargs in ({"src_key_padding_mask": padding}, {"src_mask": causal, "is_causal": True}):
        assert_same(compiled(x, **kwargs), layer(x, **kwargs), (x, *layer.parameters()))


def test_encoder_layer_inference_uses_this_attention():
    """Eval under no_grad: nn.TransformerEncoderLayer's fused fast path (torch's attention) stays off."""
    pytest.importorskip("ring_multihead")
    layer = encoder_layer().eval()
    x = torch.randn(B, N, E, dtype=torch.float64)
    with torch.no_grad():
        first = layer.norm1(x + layer.self_attn(x, x, x, need_weights=False)[0])
        expected = layer.norm2(first + layer.linear2(layer.activation(layer.linear1(first))))
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-12, atol=1e-12)


def test_compiled_float_padding_must_be_binary():
    """Compiled, a float key padding mask cannot choose the dense path by its values: the op refuses others."""
    pytest.importorskip("ring_multihead")
    module = multihead("multihead")
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, N, E, dtype=torch.float64)
    mask = torch.zeros(B, N, dtype=torch.float64)
    mask[:, -2:] = float("-inf")
    torch.testing.assert_close(
        compiled(x, x, x, key_padding_mask=mask, need_weights=False)[0],
        module(x, x, x, key_padding_mask=mask, need_weights=False)[0],
        rtol=1e-12,
        atol=1e-12,
    )
    mask[:, 0] = -1.5
    with pytest.raises(ValueError, match="only 0 .* and -inf"):
        compiled(x, x, x, key_padding_mask=mask, need_weights=False)


@pytest.mark.parametrize("name", ["dilated", "ring_dilated"])
def test_packed_and_windowed_compile_without_break(name):
    """cu_seqlens reaches the op as a tensor (its values are read inside it) and the window is configuration."""
    attn = build(name, window_size=(3, 0))
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    (q, k, v), _ = qkv(2)
    q, k, v = (x[:1].detach().requires_grad_() for x in (q, k, v))
    cu_seqlens = torch.tensor([0, 5, 5, N])
    compile_graph(attn, q, k, v, is_causal=True, cu_seqlens=cu_seqlens)
    kwargs = {"is_causal": True, "cu_seqlens": cu_seqlens}
    assert_same(compiled(q, k, v, **kwargs), attn(q, k, v, **kwargs), (q, k, v))
    with pytest.raises(ValueError, match="cu_seqlens must end at N=12"):  # checked inside the op when compiled
        compiled(q, k, v, cu_seqlens=torch.tensor([0, 5, 11]))


def _math_attention(q, k, v):
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5
    lse = torch.logsumexp(scores, -1)
    return torch.einsum("bhnm,bmhd->bnhd", torch.exp(scores - lse[..., None]), v), lse.transpose(1, 2)


class _RecomputingOp(ring_core.plugin.AttentionOp):
    """An op whose backward differentiates its own recomputation: autograd inside the op's body."""

    def forward(self, q, k, v, call):
        with torch.no_grad():
            return _math_attention(q, k, v)

    def backward(self, dout, q, k, v, out, lse, call):
        with ring_core.plugin.eager_dispatch(), torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            return torch.autograd.grad(_math_attention(*leaves)[0], leaves, dout)


def test_eager_dispatch_gives_an_op_body_autograd():
    """Compiled, the op's body runs below autograd; ``eager_dispatch`` gives it back (no double graph: the
    gradients equal eager autograd's through the same math)."""
    op = _RecomputingOp()
    compiled = torch.compile(lambda q, k, v: ring_core.plugin.run_attention(op, q, k, v)[0], fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    (q, k, v), _ = qkv(4)
    k, v = (x.detach().repeat_interleave(2, 2).requires_grad_() for x in (k, v))
    out = compiled(q, k, v)
    expected = _math_attention(q, k, v)[0]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(expected.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
