"""MAGNETO initialisation (Wang et al., 2022, "Foundation Transformers", arXiv:2210.06423).

MAGNETO is a pre-LN Transformer with a *sub-LayerNorm*: inside attention a LayerNorm
sits between the attention and the output projection, and inside the feed-forward
network between the activation and the second linear layer. Its initialisation
(the paper's Fig. 2, ``subln_init``, and torchscale's ``Encoder``/``Decoder``):

- ``q_proj``, ``k_proj``: ``xavier_normal_(w, gain=1)``;
- ``v_proj``, ``out_proj`` (and the FFN's ``fc1``, ``fc2``): ``xavier_normal_(w, gain=gamma)``;
- biases zero.

with ``gamma`` from the depth of the model:

- encoder-only or decoder-only with ``N`` layers: ``gamma = sqrt(log(2N))``;
- encoder-decoder, ``M`` encoder and ``N`` decoder layers:
  encoder ``gamma = sqrt(log(3N) * log(2M) / 3)``, decoder ``gamma = sqrt(log(3N))``.
"""

from __future__ import annotations

import math


def magneto_gamma(num_layers: int) -> float:
    """``sqrt(log(2N))``: MAGNETO's ``gamma`` for an encoder-only or decoder-only model of ``N`` layers."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return math.sqrt(math.log(2 * num_layers))


def magneto_gamma_encoder_decoder(encoder_layers: int, decoder_layers: int) -> tuple[float, float]:
    """``(gamma_encoder, gamma_decoder)`` of an encoder-decoder with ``M`` and ``N`` layers.

    ``gamma_encoder = sqrt(log(3N) * log(2M) / 3)``, ``gamma_decoder = sqrt(log(3N))``.
    """
    for name, value in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    encoder = math.sqrt(math.log(3 * decoder_layers) * math.log(2 * encoder_layers) / 3)
    return encoder, math.sqrt(math.log(3 * decoder_layers))
