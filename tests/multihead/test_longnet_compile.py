"""``torch.compile(LongNetLM, fullgraph=True)``: one graph, no break, eager's logits and gradients (CPU, float64)."""

from __future__ import annotations

import pytest
import torch

from ring_multihead import LongNetLM

VOCAB, MAX_LEN = 31, 40


def model(**options) -> LongNetLM:
    torch.manual_seed(0)
    return LongNetLM(
        VOCAB, MAX_LEN, d_model=16, num_heads=4, num_layers=2, segment_lengths=[4, 8], dilation_rates=[1, 2],
        dtype=torch.float64, **options,
    )  # fmt: skip


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, 13), generator=generator)
    positions = torch.arange(20, 33)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, -3:] = True
    return tokens, positions, mask


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_longnet_lm_compiles_without_graph_breaks_and_matches_eager(checkpointing):
    torch._dynamo.reset()
    lm = model(activation_checkpointing=checkpointing)
    tokens, positions, mask = inputs()
    for args in ((tokens,), (tokens, positions, mask)):
        explanation = torch._dynamo.explain(lm)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")
    params = list(lm.parameters())
    for args in ((tokens,), (tokens, positions, mask)):
        expected = lm(*args)
        logits = compiled(*args)
        torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
        weights = torch.linspace(-1, 1, expected.numel(), dtype=expected.dtype).view(expected.shape)
        for got, want in zip(
            torch.autograd.grad((logits * weights).sum(), params),
            torch.autograd.grad((expected * weights).sum(), params),
        ):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_compiled_longnet_lm_still_rejects_positions_out_of_range():
    torch._dynamo.reset()
    lm = model()
    tokens, _, _ = inputs()
    compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match=r"positions must be in \[0, max_seq_len=40\)"):
        compiled(tokens, torch.arange(30, 43))
    with pytest.raises(ValueError, match=r"positions must be in \[0, max_seq_len=40\), got values from 30 to 42"):
        lm(tokens, torch.arange(30, 43))
