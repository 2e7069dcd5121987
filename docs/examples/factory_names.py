"""Modules by name, and why "auto" picks one (a test runs it)."""

import ring_core
from ring_core import create_attention, create_multihead_attention

attn = create_attention(
    "ring_dilated", segment_lengths=[2048, 4096], dilation_rates=[1, 2]
)
mha = create_multihead_attention(
    "multihead_dilated",
    embed_dim=512,
    num_heads=8,
    segment_lengths=[2048, 4096],
    dilation_rates=[1, 2],
)

best, reasons = ring_core.explain_auto("attention", device="cpu", world_size=1)
print(
    "\n".join(reasons)
)  # one line per implementation, then "-> <the one auto picks>"
