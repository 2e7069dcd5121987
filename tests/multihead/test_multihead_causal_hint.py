"""``is_causal=True`` with an ``attn_mask``: a hint, trusted as ``nn.MultiheadAttention`` trusts it.

Without padding and weights the mask is not read (causal attention whatever it holds); with
``key_padding_mask`` or ``need_weights=True`` it applies as given. Outputs and every gradient
equal ``nn.MultiheadAttention``'s in each form, float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from mh_helpers import F64, assert_close, pair, randn, run
from torch.overrides import TorchFunctionMode

from ring_multihead import MultiheadDilatedAttention

L = 9


def not_causal_mask(kind: str) -> torch.Tensor:
    """A mask that is not the causal one: random blocked keys, every query keeps key 0."""
    generator = torch.Generator().manual_seed(11)
    blocked = torch.rand(L, L, generator=generator) < 0.4
    blocked[:, 0] = False
    if kind == "bool":
        return blocked
    return torch.randn(L, L, generator=generator, dtype=F64).masked_fill(blocked, float("-inf"))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize(("padding", "need_weights"), [(False, False), (False, True), (True, False), (True, True)])
def test_a_non_causal_mask_with_the_hint_behaves_as_nn(mask_kind, padding, need_weights):
    reference, ours = pair(batch_first=True, segment_lengths=[16], dilation_rates=[1])
    inputs = [randn(2, L, 12, seed=i) for i in range(3)]
    kwargs = {"attn_mask": not_causal_mask(mask_kind), "is_causal": True, "need_weights": need_weights}
    if padding:
        padded = torch.zeros(2, L, dtype=torch.bool)
        padded[:, -3:] = True
        kwargs["key_padding_mask"] = padded
    grad_out = randn(2, L, 12, seed=99)

    def grad_weights(shape):
        return randn(*shape, seed=98)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "mismatched key_padding_mask and attn_mask"
        expected = run(reference, inputs, grad_out, grad_weights, **kwargs)
    got = run(ours, inputs, grad_out, grad_weights, **kwargs)
    assert_close({"out": got[0]}, {"out": expected[0]})
    if need_weights:
        assert_close({"weights": got[1]}, {"weights": expected[1]})
    assert_close(got[2], expected[2])
    if not padding and not need_weights:  # the hint was trusted: plain causal attention
        causal = run(ours, inputs, grad_out, grad_weights, is_causal=True, attn_mask=None, need_weights=False)
        assert_close({"out": got[0]}, {"out": causal[0]})


class MaskReads(TorchFunctionMode):
    """Records every torch function that receives ``mask`` (by identity)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask, self.calls = mask, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(a is self.mask for a in (*args, *kwargs.values())):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_a_trusted_hint_never_reads_the_mask(mask_kind):
    """Only the mask's shape and dtype are looked at, no pass over its elements (an L x S read per call)."""
    module = MultiheadDilatedAttention(12, 3, batch_first=True, dtype=F64)
    x = randn(2, L, 12, seed=1)
    mask = not_causal_mask(mask_kind)
    with MaskReads(mask) as reads:
        module(x, x, x, attn_mask=mask, is_causal=True, need_weights=False)
    assert set(reads.calls) <= {"__get__", "dim", "size", "is_floating_point"}, reads.calls
    with MaskReads(mask) as reads:  # weights asked for: the mask applies as given, so it is read
        module(x, x, x, attn_mask=mask, need_weights=True, is_causal=True)
    assert set(reads.calls) - {"__get__", "dim", "size", "is_floating_point"}, reads.calls
