"""Construction, MAGNETO init, the factory, dropout and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from mh_helpers import F64, randn
from torch import nn

import ring_core
from ring_multihead import (
    MultiheadDilatedAttention,
    RingMultiheadDilatedAttention,
    magneto_gamma,
    magneto_gamma_encoder_decoder,
)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("multihead_dilated", MultiheadDilatedAttention),
        ("MultiheadDilatedAttention", MultiheadDilatedAttention),
        ("ring_multihead_dilated", RingMultiheadDilatedAttention),
        ("RingMultiheadDilatedAttention", RingMultiheadDilatedAttention),
    ],
)
def test_factory_builds_both(name, cls):
    module = ring_core.create_multihead_attention(
        name, embed_dim=16, num_heads=4, segment_lengths=[4, 8], dilation_rates=[1, 2], batch_first=True
    )
    assert type(module) is cls
    x = torch.randn(2, 8, 16)
    out, weights = module(x, x, x, is_causal=True)
    assert out.shape == x.shape and weights.shape == (2, 8, 8)


def test_registered_as_multihead_kind():
    records = {i.name: i for i in ring_core.list_implementations("multihead")}
    assert records["multihead_dilated"].package == "ring-multihead" and not records["multihead_dilated"].distributed
    assert records["ring_multihead_dilated"].distributed
    with pytest.raises(ring_core.UnknownImplementationError, match="create_multihead_attention"):
        ring_core.create_attention("multihead_dilated")


def test_state_dict_of_nn_multihead_attention_loads():
    reference = nn.MultiheadAttention(16, 4, kdim=6, vdim=10, add_bias_kv=True)
    MultiheadDilatedAttention(16, 4, kdim=6, vdim=10, add_bias_kv=True).load_state_dict(reference.state_dict())
    with_norm = MultiheadDilatedAttention(16, 4, layer_norm=True)
    result = with_norm.load_state_dict(nn.MultiheadAttention(16, 4).state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["norm.bias", "norm.weight"] and not result.unexpected_keys


def test_magneto_gamma_formulas():
    assert magneto_gamma(6) == pytest.approx(math.sqrt(math.log(12)))
    encoder, decoder = magneto_gamma_encoder_decoder(6, 12)
    assert encoder == pytest.approx(math.sqrt(math.log(36) * math.log(12) / 3))
    assert decoder == pytest.approx(math.sqrt(math.log(36)))
    with pytest.raises(ValueError, match="num_layers"):
        magneto_gamma(0)


@pytest.mark.parametrize("kdim", (None, 96))
def test_magneto_init_scales_value_and_output(kdim):
    """xavier_normal_: std = gain * sqrt(2 / (fan_in + fan_out)); gain 1 for q, k and gamma for v, out."""
    torch.manual_seed(0)
    e, gamma = 256, 2.5
    module = MultiheadDilatedAttention(e, 8, kdim=kdim, vdim=kdim, gamma_init=gamma)
    if kdim is None:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    for weight, gain in ((wq, 1.0), (wk, 1.0), (wv, gamma), (module.out_proj.weight, gamma)):
        fan_out, fan_in = weight.shape
        assert weight.std().item() == pytest.approx(gain * math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    assert module.in_proj_bias.abs().max() == 0 and module.out_proj.bias.abs().max() == 0


def test_layer_norm_is_the_sub_layernorm_before_out_proj():
    module = MultiheadDilatedAttention(8, 2, batch_first=True, layer_norm=True, layer_norm_eps=1e-3, dtype=F64)
    assert isinstance(module.norm, nn.LayerNorm) and module.norm.eps == 1e-3
    seen = []
    module.out_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = randn(2, 5, 8, seed=0)
    module(x, x, x, need_weights=False)
    torch.testing.assert_close(seen[0].mean(-1), torch.zeros(2, 5, dtype=F64), rtol=0, atol=1e-12)


def test_dropout_train_and_eval():
    module = MultiheadDilatedAttention(
        8, 2, dropout=0.4, batch_first=True, segment_lengths=[4, 8], dilation_rates=[1, 2]
    )
    plain = MultiheadDilatedAttention(8, 2, batch_first=True, segment_lengths=[4, 8], dilation_rates=[1, 2])
    plain.load_state_dict(module.state_dict())
    x = torch.randn(2, 8, 8)
    module.eval()
    torch.testing.assert_close(module(x, x, x, need_weights=False)[0], plain(x, x, x, need_weights=False)[0])
    module.train()
    torch.manual_seed(1)
    first = module(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    torch.testing.assert_close(module(x, x, x, need_weights=False)[0], first)  # seeded: reproducible
    assert not torch.allclose(first, plain(x, x, x, need_weights=False)[0])
    _, weights = module(x, x, x, average_attn_weights=False)  # returned weights carry the dropout, as torch's
    assert (weights == 0).any()
    mean = torch.stack([module(x, x, x, need_weights=False)[0] for _ in range(300)]).mean(0)
    expected = plain(x, x, x, need_weights=False)[0]
    assert (mean - expected).norm() / expected.norm() < 0.1  # inverted dropout keeps the expectation


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MultiheadDilatedAttention(10, 3), "divisible by num_heads"),
        (lambda: MultiheadDilatedAttention(0, 1), "embed_dim must be a positive int"),
        (lambda: MultiheadDilatedAttention(8, 2, dilation_rates=[1]), "needs segment_lengths"),
        (lambda: MultiheadDilatedAttention(8, 2, segment_lengths=[8, 4]), "strictly increasing"),
        (lambda: MultiheadDilatedAttention(8, 2, segment_lengths=[4], merge="sum"), "merge must be one of"),
        (lambda: MultiheadDilatedAttention(8, 2, dropout=1.0), "dropout must be"),
        (
            lambda: MultiheadDilatedAttention(8, 2, segment_lengths=[2, 4, 8], merge="head_groups"),
            "at least one head per branch",
        ),
        (lambda: MultiheadDilatedAttention(8, 2, gamma_init=0), "gamma_init"),
        (lambda: RingMultiheadDilatedAttention(8, 2, layout="spiral"), "layout must be one of"),
    ],
)
def test_constructor_errors(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def _call(module, n=6, s=None, **kwargs):
    s = n if s is None else s
    return module(torch.randn(2, n, 8), torch.randn(2, s, 8), torch.randn(2, s, 8), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, r"key_padding_mask must have shape \(2, 6\)"),
        ({"key_padding_mask": torch.zeros(2, 6, dtype=torch.int64)}, "bool or floating-point"),
        ({"attn_mask": torch.zeros(6, 5, dtype=torch.bool)}, r"attn_mask must have shape \(L, S\) = \(6, 6\)"),
        ({"attn_mask": torch.zeros(6, 6, dtype=torch.int64)}, "bool or floating-point"),
        (
            {"attn_mask": torch.zeros(6, 6, dtype=torch.int64), "is_causal": True, "need_weights": False},
            "bool or floating-point",
        ),
        ({"attn_mask": torch.zeros(6, 5), "is_causal": True, "need_weights": False}, r"must have shape \(L, S\)"),
        ({"s": 4, "is_causal": True}, "is_causal=True needs query and key of the same length"),
    ],
)
def test_forward_errors(kwargs, match):
    module = MultiheadDilatedAttention(8, 2, batch_first=True)
    with pytest.raises((ValueError, TypeError), match=match):
        _call(module, **kwargs)


def test_input_errors_name_the_argument():
    module = MultiheadDilatedAttention(8, 2, kdim=4, batch_first=True)
    with pytest.raises(ValueError, match="key must have 4 features"):
        module(torch.randn(2, 6, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="query must be 3-D"):
        module(torch.randn(1, 2, 6, 8), torch.randn(2, 6, 4), torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="share the batch size"):
        module(torch.randn(2, 6, 8), torch.randn(3, 6, 4), torch.randn(3, 6, 8))
    dilated = MultiheadDilatedAttention(8, 2, batch_first=True, segment_lengths=[4], dilation_rates=[2])
    with pytest.raises(ValueError, match="needs query and key of the same length"):
        _call(dilated, s=4)


def test_dense_path_limit_is_a_clear_error_and_fast_path_has_none():
    module = MultiheadDilatedAttention(8, 2, batch_first=True, segment_lengths=[4, 8], dilation_rates=[1, 2])
    module.max_dense_scores = 100
    with pytest.raises(ValueError, match=r"max_dense_scores = 100; got 12 x 12 = 144. Pass need_weights=False"):
        _call(module, n=12)
    with pytest.raises(ValueError, match="max_dense_scores"):
        _call(module, n=12, need_weights=False, attn_mask=torch.eye(12, dtype=torch.bool))
    out, weights = _call(module, n=12, need_weights=False, is_causal=True)
    assert weights is None and out.shape == (2, 12, 8)
    assert MultiheadDilatedAttention.max_dense_scores == 1 << 24


def test_float32_matches_float64():
    module = MultiheadDilatedAttention(16, 4, batch_first=True, segment_lengths=[4, 16], dilation_rates=[1, 4])
    x = torch.randn(2, 16, 16)
    out32 = module(x, x, x, need_weights=False, is_causal=True)[0]
    out64 = module.double()(x.double(), x.double(), x.double(), need_weights=False, is_causal=True)[0]
    assert (out32.double() - out64).norm() / out64.norm() < 1e-5
