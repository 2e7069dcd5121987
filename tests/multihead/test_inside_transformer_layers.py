"""The drop-in inside torch's TransformerEncoderLayer/TransformerEncoder, in eval under no_grad and inference_mode.

torch takes a fused fast path there that calls a dense-attention kernel with the layer's
weights, never the module: it must be skipped, so the result is the module's (dilated) one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ring_core


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    layer.self_attn = ring_core.create_multihead_attention(
        "multihead_dilated", embed_dim=16, num_heads=4, segment_lengths=[4, 8], dilation_rates=[1, 2], batch_first=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch says why nested tensors are off: the fast path is
        encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    return layer, encoder.eval()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_eval_without_grad_gives_the_modules_result(mode):
    layer, encoder = _encoder()
    x = torch.randn(2, 8, 16)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 6:] = True
    expected_layer, expected = layer(x, src_key_padding_mask=padding), encoder(x, src_key_padding_mask=padding)
    with mode():
        assert torch.equal(layer(x, src_key_padding_mask=padding), expected_layer)
        assert torch.equal(encoder(x, src_key_padding_mask=padding), expected)
        assert torch.equal(encoder(x), encoder(x.clone()))
