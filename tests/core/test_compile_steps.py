"""Repeated calls of one shape compile once: the ring modules count their calls (``step``) in a tensor.

``torch.compile`` specialises on a module's int attributes, so a step counted as an int in
``forward`` made every call recompile (until the recompile limit).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import ring_core

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]
CONFIG = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}


def build(name: str):
    impl = ring_core.resolve_implementation(name)
    return ring_core.create_attention(impl.name, **CONFIG, **impl.options)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_repeated_calls_compile_once(impl):
    torch._dynamo.reset()
    attn = build(impl.name)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(attn, fullgraph=True, backend=counter)
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 16, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3))
        compiled(q, k, v, is_causal=True)
    assert counter.frame_count == 1
    if hasattr(attn, "step"):
        assert attn.step == 3
        attn.step = 10  # settable, as before
        compiled(q, k, v, is_causal=True)
        assert attn.step == 11 and counter.frame_count == 1
