"""A transformer block with causal dilated attention (a test runs it)."""

import torch
from torch import nn

from ring_core import create_attention


class Block(nn.Module):
    def __init__(self, dim: int = 256, heads: int = 8) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn = create_attention(
            "dilated",
            segment_lengths=[256, 512, 1024],
            dilation_rates=[1, 2, 4],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, N, dim)
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))
        q, k, v = qkv.unbind(2)  # each (B, N, H, D)
        out = self.attn(q, k, v, is_causal=True)  # (B, N, H, D)
        return x + self.proj(out.flatten(2))


x = torch.randn(2, 3000, 256)  # any N: no divisibility by the segments
y = Block()(x)
y.sum().backward()
print(y.shape)  # torch.Size([2, 3000, 256])
