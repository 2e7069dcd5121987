"""``torch.compile(RingDilatedAttentionProduction)``: one compilation for repeated calls of one shape (one process).

The step counter is a tensor: an int attribute counted in ``forward`` is a constant to
torch.compile, which then recompiled every call (until its recompile limit).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from ring_distributed import RingDilatedAttentionProduction

CONFIG = {"segment_lengths": [4, 8], "dilation_rates": [1, 2]}


def qkv(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 12, 4, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 12, 2, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "checkpoint"])
def test_repeated_calls_compile_once_and_count_steps(checkpoint):
    torch._dynamo.reset()
    attn = RingDilatedAttentionProduction(**CONFIG, checkpoint=checkpoint)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(attn, fullgraph=True, backend=counter)
    for seed in range(4):
        q, k, v = qkv(seed)
        compiled(q, k, v, is_causal=True).sum().backward()
    assert counter.frame_count == 1
    assert attn.step == 4
    attn(*qkv(), is_causal=True)  # eager calls count too
    assert attn.step == 5


def test_compiled_equals_eager():
    torch._dynamo.reset()
    attn = RingDilatedAttentionProduction(**CONFIG)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    q, k, v = qkv(1)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, -3:] = True
    for _ in range(2):
        out, lse = compiled(q, k, v, is_causal=True, key_padding_mask=mask, return_lse=True)
        expected, expected_lse = attn(q, k, v, is_causal=True, key_padding_mask=mask, return_lse=True)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
        for got, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (q, k, v))):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert attn.step == 4


@pytest.mark.parametrize("options", [{"on_nonfinite": "raise"}, {"deterministic": True}], ids=["nonfinite", "det"])
def test_host_side_options_are_refused_when_compiled(options):
    torch._dynamo.reset()
    attn = RingDilatedAttentionProduction(**CONFIG, **options)
    with pytest.raises(Exception, match="reads values on the host in every call and runs eager only"):
        torch.compile(attn, fullgraph=True, backend="aot_eager")(*qkv())
