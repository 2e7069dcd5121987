"""Our attention over a sequence merged with one's own over memory tokens.

(docs/compile.md; a test runs it.)
"""

import torch
import torch.nn.functional as F

import ring_core

f64 = torch.float64
# (B, N, H, D): a sequence, and 16 memory tokens' keys and values
q, k, v = (torch.randn(1, 512, 4, 32, dtype=f64) for _ in range(3))
memory_k, memory_v = (torch.randn(1, 16, 4, 32, dtype=f64) for _ in range(2))

# dense: one segment spans the sequence
attn = ring_core.create_attention(
    "dilated", segment_lengths=[512], dilation_rates=[1]
)
out, lse = attn(q, k, v, return_lse=True)  # lse: (B, H, N)
scores = torch.einsum("bnhd,bmhd->bhnm", q, memory_k) * q.shape[-1] ** -0.5
theirs = (
    torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), memory_v),
    scores.logsumexp(-1),
)
# attention over the sequence and the memory together
out, lse = ring_core.merge_attention(out, lse, *theirs)

keys, values = torch.cat([k, memory_k], 1), torch.cat([v, memory_v], 1)
everything = F.scaled_dot_product_attention(
    q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
).transpose(1, 2)
print(torch.allclose(out, everything, rtol=1e-10, atol=1e-12))
