"""Dilated attention as a function, flash-attn style (a test runs it)."""

import torch

from ring_core import dilated_attention

q = k = v = torch.randn(1, 8192, 8, 64)  # (B, N, H, D)
out = dilated_attention(
    q,
    k,
    v,
    segment_lengths=[2048, 4096],
    dilation_rates=[1, 2],
    is_causal=True,
)
