"""Parity with ``torch.nn.MultiheadAttention`` (dense configuration), outputs and every gradient, float64.

``segment_lengths=[>= N]``, ``dilation_rates=[1]``, ``layer_norm=False`` and the
weights of an ``nn.MultiheadAttention``: everything must agree to 1e-10.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from mh_helpers import F64, assert_close, pair, randn, run
from torch import nn

L = 7  # query and key length; the dense segment below covers it
LAYOUTS = ("batch_first", "seq_first", "unbatched")
PADDING = (None, "bool", "float01", "float")  # float01: only 0 / -inf; float: any additive values
CAUSAL = (None, "bool_mask", "float_mask", "hint")  # hint: causal float mask and is_causal=True
PROJECTIONS = ("packed", "kdim_vdim")
EXTRAS = ("none", "bias_kv", "zero_attn", "both")
WEIGHTS = ("none", "average", "per_head")


def make_inputs(layout: str, projection: str, batch: int = 2, seed: int = 0, embed_dim: int = 12):
    kdim, vdim = (5, 7) if projection == "kdim_vdim" else (embed_dim, embed_dim)
    shape = {"batch_first": (batch, L), "seq_first": (L, batch), "unbatched": (L,)}[layout]
    return [randn(*shape, dim, seed=seed + i) for i, dim in enumerate((embed_dim, kdim, vdim))]


def key_padding(kind: str | None, layout: str, batch: int = 2, seed: int = 7):
    if kind is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    padded = torch.rand(batch, L, generator=generator) < 0.4
    padded[:, 0] = False  # every query keeps a key (nn.MultiheadAttention gives NaN otherwise)
    if kind == "bool":
        mask = padded
    elif kind == "float01":
        mask = torch.zeros(batch, L, dtype=F64).masked_fill(padded, float("-inf"))
    else:
        mask = torch.randn(batch, L, generator=generator, dtype=F64).masked_fill(padded, float("-inf"))
    return mask[0] if layout == "unbatched" else mask


def causal_kwargs(kind: str | None) -> dict:
    if kind is None:
        return {}
    if kind == "bool_mask":
        return {"attn_mask": torch.ones(L, L, dtype=torch.bool).triu(1)}
    mask = nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
    return {"attn_mask": mask, "is_causal": kind == "hint"}


def weight_kwargs(kind: str) -> dict:
    return {"need_weights": kind != "none", "average_attn_weights": kind == "average"}


def compare(reference, ours, inputs, reference_overrides: dict | None = None, **kwargs) -> None:
    grad_out_shape = inputs[0].shape
    grad_out = randn(*grad_out_shape, seed=99)

    def grad_weights(shape):
        return randn(*shape, seed=98)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "mismatched key_padding_mask and attn_mask"
        expected_out, expected_weights, expected_grads = run(
            reference, inputs, grad_out, grad_weights, **{**kwargs, **(reference_overrides or {})}
        )
    out, weights, grads = run(ours, inputs, grad_out, grad_weights, **kwargs)
    assert_close({"out": out}, {"out": expected_out})
    if expected_weights is None:
        assert weights is None
    else:
        assert_close({"weights": weights}, {"weights": expected_weights})
    assert_close(grads, expected_grads)


@pytest.mark.parametrize("causal", CAUSAL, ids=str)
@pytest.mark.parametrize("padding", PADDING, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_nn_multihead_attention(layout, padding, causal):
    """Every layout x padding x causal form x projection x extra keys; the weights mode rotates
    (none = the fast O(N) path, average, per head) so each one meets every other axis."""
    rotation = LAYOUTS.index(layout) + PADDING.index(padding) + CAUSAL.index(causal)
    for index, (projection, extras) in enumerate(itertools.product(PROJECTIONS, EXTRAS)):
        weights = WEIGHTS[(rotation + index) % len(WEIGHTS)]
        kdim, vdim = (5, 7) if projection == "kdim_vdim" else (None, None)
        reference, ours = pair(
            batch_first=layout == "batch_first",
            kdim=kdim,
            vdim=vdim,
            add_bias_kv=extras in ("bias_kv", "both"),
            add_zero_attn=extras in ("zero_attn", "both"),
            segment_lengths=[8],
            dilation_rates=[1],
            seed=index,
        )
        # torch drops a hinted causal attn_mask when there is no padding and no weights, and then SDPA's
        # top-left causal mask hides the add_bias_kv / add_zero_attn keys, unlike the same call without
        # the hint; the hint must not change results, so compare with the unhinted call there.
        overrides = {"is_causal": False} if causal == "hint" and extras != "none" else None
        compare(
            reference,
            ours,
            make_inputs(layout, projection, seed=index),
            overrides,
            key_padding_mask=key_padding(padding, layout),
            **causal_kwargs(causal),
            **weight_kwargs(weights),
        )


GENERAL_MASKS = ("bool_2d", "float_2d", "bool_3d", "float_3d")


def general_mask(kind: str, heads: int, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    shape = (L, L) if kind.endswith("2d") else (batch * heads, L, L)
    blocked = torch.rand(*shape, generator=generator) < 0.3
    blocked[..., 0] = False  # every query keeps a key
    if kind.startswith("bool"):
        return blocked
    return torch.randn(*shape, generator=generator, dtype=F64).masked_fill(blocked, float("-inf"))


@pytest.mark.parametrize("weights", ("none", "per_head"))
@pytest.mark.parametrize(("padding", "extras"), [(None, "none"), ("bool", "both"), ("float", "bias_kv")])
@pytest.mark.parametrize("kind", GENERAL_MASKS)
def test_general_attn_mask_is_honoured(kind, padding, extras, weights):
    """Any attn_mask nn.MultiheadAttention takes (2-D or (B*H, L, S), bool or float) on the dense path."""
    reference, ours = pair(
        batch_first=True,
        add_bias_kv=extras in ("bias_kv", "both"),
        add_zero_attn=extras == "both",
        segment_lengths=[8],
        dilation_rates=[1],
    )
    compare(
        reference,
        ours,
        make_inputs("batch_first", "packed"),
        key_padding_mask=key_padding(padding, "batch_first"),
        attn_mask=general_mask(kind, heads=3),
        **weight_kwargs(weights),
    )


@pytest.mark.parametrize("need_weights", (True, False))
@pytest.mark.parametrize("batch_first", (True, False))
def test_self_attention_same_tensor_and_default_config(batch_first, need_weights):
    """query is key is value (nn.MultiheadAttention's packed projection), default (dense) configuration."""
    torch.manual_seed(3)
    reference = nn.MultiheadAttention(12, 4, batch_first=batch_first, dtype=F64)
    from ring_multihead import MultiheadDilatedAttention

    ours = MultiheadDilatedAttention(12, 4, batch_first=batch_first, dtype=F64)
    ours.load_state_dict(reference.state_dict())
    x = randn(2, 9, 12, seed=1)
    outs = []
    for module in (reference, ours):
        leaf = x.clone().requires_grad_()
        out, _ = module(leaf, leaf, leaf, need_weights=need_weights)
        out.backward(randn(*out.shape, seed=2))
        outs.append((out, leaf.grad))
    assert_close({"out": outs[1][0], "dx": outs[1][1]}, {"out": outs[0][0], "dx": outs[0][1]})


@pytest.mark.parametrize("layout", ("batch_first", "seq_first"))
def test_cross_attention_of_other_length(layout):
    """Dense configuration, query length != key length (decoder cross-attention)."""
    reference, ours = pair(batch_first=layout == "batch_first", kdim=5, vdim=7)
    q = randn(*((2, 4) if layout == "batch_first" else (4, 2)), 12, seed=1)
    k, v = make_inputs(layout, "kdim_vdim")[1:]
    padding = key_padding("bool", layout)
    for weights in WEIGHTS:
        compare(reference, ours, [q, k, v], key_padding_mask=padding, **weight_kwargs(weights))


def test_parameter_names_and_shapes_match():
    for kwargs in itertools.product((None, 5), (False, True), (False, True)):
        kdim, bias, bias_kv = kwargs
        reference, ours = pair(kdim=kdim, vdim=kdim, bias=bias, add_bias_kv=bias_kv)
        expected = {name: tuple(p.shape) for name, p in reference.named_parameters()}
        assert {name: tuple(p.shape) for name, p in ours.named_parameters()} == expected
        assert ours.state_dict().keys() == reference.state_dict().keys()


def test_cross_attention_fast_path_has_no_length_limit():
    """need_weights=False with L != S runs on the engine (no dense probabilities), extra keys included."""
    reference, ours = pair(batch_first=True, add_bias_kv=True, add_zero_attn=True)
    ours.max_dense_scores = 1  # any dense computation would raise
    q, k, v = randn(2, 3, 12, seed=1), randn(2, L, 12, seed=2), randn(2, L, 12, seed=3)
    compare(reference, ours, [q, k, v], key_padding_mask=key_padding("bool", "batch_first"), need_weights=False)


@pytest.mark.parametrize("extras", EXTRAS)
@pytest.mark.parametrize("need_weights", [False, True], ids=["fast", "dense"])
@pytest.mark.parametrize(("q_len", "k_len"), [(0, 5), (3, 0), (0, 0)])
def test_no_query_or_no_key_matches(q_len, k_len, need_weights, extras):
    """nn.MultiheadAttention's empty output, or with no key zeros (or the extra keys' attention), and gradients.

    The fused CPU kernel once stopped the process (SIGFPE) on these, and the dense path raised in ``amax``."""
    bias_kv, zero_attn = extras in ("bias_kv", "both"), extras in ("zero_attn", "both")
    reference, ours = pair(batch_first=True, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
    inputs = [randn(2, q_len, 12, seed=1), randn(2, k_len, 12, seed=2), randn(2, k_len, 12, seed=3)]
    grad_out = randn(2, q_len, 12, seed=4)

    def grad_weights(shape):
        return randn(*shape, seed=5)

    expected, expected_weights, expected_grads = run(
        reference, inputs, grad_out, grad_weights, need_weights=need_weights
    )
    out, weights, grads = run(ours, inputs, grad_out, grad_weights, need_weights=need_weights)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert (weights is None) == (expected_weights is None)
    if weights is not None:
        torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-12)
    assert grads.keys() == expected_grads.keys()
    for name, expected_grad in expected_grads.items():
        grad = grads[name]
        if expected_grad is None or grad is None:  # a parameter no output reads: torch leaves None, we may give 0
            assert not any(g is not None and g.any() for g in (grad, expected_grad)), name
            continue
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12, msg=name)


def test_a_3d_mask_of_no_query_rows():
    reference, ours = pair(batch_first=True)
    q, k = randn(2, 0, 12, seed=1), randn(2, 5, 12, seed=2)
    mask = torch.zeros(2 * 3, 0, 5, dtype=torch.bool)  # (B * heads, L = 0, S)
    out, _ = ours(q, k, k, attn_mask=mask)
    assert out.shape == reference(q, k, k, attn_mask=mask)[0].shape == (2, 0, 12)


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_a_float_mask_of_zeros_and_minus_inf_gets_its_gradient(which):
    """Such a mask is read as bool (the causal fast path) unless it requires grad: then nn.MultiheadAttention's."""
    reference, ours = pair(batch_first=True)
    x = randn(2, L, 12, seed=1)
    mask = (
        nn.Transformer.generate_square_subsequent_mask(L, dtype=F64)
        if which == "attn_mask"
        else key_padding("float01", "batch_first")
    )
    grads = []
    for module in (reference, ours):
        leaf = mask.clone().requires_grad_()
        out, _ = module(x, x, x, **{which: leaf})
        (out * randn(*out.shape, seed=2)).sum().backward()
        grads.append(leaf.grad)
    assert grads[1] is not None
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_tensors_from_a_transformer_encoder_are_refused_clearly():
    """A drop-in swapped into an nn.TransformerEncoder built around nn.MultiheadAttention gets its nested tensors
    (eval, no grad, padding): a clear error saying what to do, not torch's internal one."""
    layer = nn.TransformerEncoderLayer(12, 2, 16, dropout=0.0, batch_first=True, dtype=F64)  # even heads: nested
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    for block in encoder.layers:
        reference = block.self_attn
        block.self_attn = pair(num_heads=2, batch_first=True)[1]
        block.self_attn.load_state_dict(reference.state_dict())
    padding = torch.zeros(2, L, dtype=torch.bool)
    padding[0, -2:] = True
    with torch.no_grad(), pytest.raises(TypeError, match="nested tensor.*enable_nested_tensor=False"):
        encoder(randn(2, L, 12, seed=1), src_key_padding_mask=padding)
    encoder.use_nested_tensor = False  # what enable_nested_tensor=False sets
    with torch.no_grad():
        assert encoder(randn(2, L, 12, seed=1), src_key_padding_mask=padding).isfinite().all()
