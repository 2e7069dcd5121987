"""DilatedTransformerEncoderLayer / DecoderLayer against torch's layers (dense), MAGNETO's sub-LN, LongNetLM."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mh_helpers import F64, assert_close
from torch import nn

from ring_multihead import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer, LongNetLM, magneto_gamma


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def grads_of(module: nn.Module, inputs: dict[str, torch.Tensor], **kwargs) -> tuple[torch.Tensor, dict]:
    """Output and the gradients of ``(output * fixed weights).sum()`` w.r.t. the inputs and every parameter."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    module.zero_grad(set_to_none=True)
    out = module(**leaves, **kwargs)
    (out * randn(*out.shape, seed=99)).sum().backward()
    grads = {f"d{name}": x.grad for name, x in leaves.items()}
    grads.update({f"d{name}": p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def causal_mask(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu(1)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize(("activation", "batch_first"), [("relu", False), ("gelu", True)])
def test_encoder_layer_equals_torch_with_a_dense_config(norm_first, activation, batch_first):
    options = {"dim_feedforward": 20, "dropout": 0.0, "activation": activation, "batch_first": batch_first}
    torch.manual_seed(0)
    reference = nn.TransformerEncoderLayer(12, 3, **options, norm_first=norm_first, dtype=F64)
    ours = DilatedTransformerEncoderLayer(12, 3, **options, norm_first=norm_first, dtype=F64)
    ours.load_state_dict(reference.state_dict())
    b, n = 2, 11
    src = randn(b, n, 12, seed=1) if batch_first else randn(n, b, 12, seed=1)
    padding = torch.zeros(b, n, dtype=torch.bool)
    padding[0, -3:] = True
    for kwargs in (
        {"src_key_padding_mask": padding},
        {"src_mask": causal_mask(n), "is_causal": True, "src_key_padding_mask": padding},
    ):
        expected = grads_of(reference, {"src": src}, **kwargs)
        actual = grads_of(ours, {"src": src}, **kwargs)
        assert_close({"out": actual[0], **actual[1]}, {"out": expected[0], **expected[1]})
    # is_causal alone is causal attention here (torch needs the mask as well)
    actual = grads_of(ours, {"src": src}, is_causal=True)
    expected = grads_of(reference, {"src": src}, src_mask=causal_mask(n), is_causal=True)
    assert_close({"out": actual[0], **actual[1]}, {"out": expected[0], **expected[1]})


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_equals_torch_with_a_dense_config(norm_first):
    options = {"dim_feedforward": 16, "dropout": 0.0, "batch_first": True, "norm_first": norm_first}
    torch.manual_seed(1)
    reference = nn.TransformerDecoderLayer(12, 4, **options, dtype=F64)
    ours = DilatedTransformerDecoderLayer(12, 4, **options, dtype=F64)
    ours.load_state_dict(reference.state_dict())
    inputs = {"tgt": randn(2, 9, 12, seed=2), "memory": randn(2, 13, 12, seed=3)}
    memory_padding = torch.zeros(2, 13, dtype=torch.bool)
    memory_padding[1, -4:] = True
    kwargs = {"tgt_mask": causal_mask(9), "tgt_is_causal": True, "memory_key_padding_mask": memory_padding}
    expected = grads_of(reference, inputs, **kwargs)
    actual = grads_of(ours, inputs, **kwargs)
    assert_close({"out": actual[0], **actual[1]}, {"out": expected[0], **expected[1]})


def test_sub_layer_norm_and_magneto_init():
    torch.manual_seed(2)
    gamma = magneto_gamma(4)
    layer = DilatedTransformerEncoderLayer(
        16, 4, 24, dropout=0.0, activation="gelu", batch_first=True, norm_first=True, dtype=F64,
        sub_layer_norm=True, gamma_init=gamma,
    )  # fmt: skip
    torch_keys = set(nn.TransformerEncoderLayer(16, 4, 24, dtype=F64).state_dict())
    assert set(layer.state_dict()) - torch_keys == {"self_attn.norm.weight", "self_attn.norm.bias"} | {
        "ffn_norm.weight",
        "ffn_norm.bias",
    }
    assert layer.linear1.bias.abs().sum() == 0 and layer.linear2.bias.abs().sum() == 0
    with torch.no_grad():  # non-trivial LayerNorm affine parameters, so the test sees where each norm sits
        for norm in (layer.norm1, layer.norm2, layer.self_attn.norm, layer.ffn_norm):
            norm.weight.normal_()
            norm.bias.normal_()
    x = randn(2, 10, 16, seed=4)
    attn = layer.self_attn
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (4, 4)).transpose(1, 2)

    h = layer.norm1(x)
    q, k, v = heads(F.linear(h, w_q, b_q)), heads(F.linear(h, w_k, b_k)), heads(F.linear(h, w_v, b_v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
    x1 = x + attn.out_proj(attn.norm(o))
    expected = x1 + layer.linear2(layer.ffn_norm(F.gelu(layer.linear1(layer.norm2(x1)))))
    actual = layer(x, is_causal=True)
    assert_close({"out": actual}, {"out": expected})


def test_layout_needs_a_process_group():
    with pytest.raises(ValueError, match="layout='zigzag' needs a process_group"):
        DilatedTransformerEncoderLayer(8, 2, layout="zigzag")


def test_longnet_lm_forward_backward():
    torch.manual_seed(3)
    model = LongNetLM(
        29, 64, d_model=16, num_heads=4, num_layers=2, segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4], dtype=F64
    )
    tokens = torch.randint(0, 29, (2, 23), generator=torch.Generator().manual_seed(5))
    logits = model(tokens)
    assert logits.shape == (2, 23, 29)
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 29
    later = model(changed)
    assert torch.equal(later[:, :15], logits[:, :15]) and not torch.allclose(later[:, 15:], logits[:, 15:])  # causal
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert sum(p.grad.abs().sum() > 0 for p in model.parameters()) == len(list(model.parameters()))
    with pytest.raises(ValueError, match=r"positions must be in \[0, max_seq_len=64\), got values from 60 to 82"):
        model(tokens, torch.arange(60, 83))
