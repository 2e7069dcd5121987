"""Three documents packed in one sequence equal three separate calls (shown in the guide; a test runs it)."""

import itertools

import torch

from ring_core import dilated_attention

# the second is shorter than a segment, the others cross segment boundaries
lengths = [700, 300, 1048]
# cumulative lengths, flash-attn's convention
cu_seqlens = torch.tensor([0, 700, 1000, 2048])
# (1, N, H, D)
q, k, v = (torch.randn(1, 2048, 8, 64, dtype=torch.float64) for _ in range(3))
config = {
    "segment_lengths": [512, 1024],
    "dilation_rates": [1, 2],
    "window_size": (256, 0),
    "is_causal": True,
}

packed = dilated_attention(q, k, v, **config, cu_seqlens=cu_seqlens)
separate = torch.cat(
    [
        dilated_attention(q[:, a:b], k[:, a:b], v[:, a:b], **config)
        for a, b in itertools.pairwise(cu_seqlens.tolist())
    ],
    dim=1,
)
print(f"max difference: {(packed - separate).abs().max().item():.1e}")

# flash-attn's varlen layout (total, H, D) works too
varlen = dilated_attention(q[0], k[0], v[0], **config, cu_seqlens=cu_seqlens)
assert torch.equal(varlen, packed[0])
