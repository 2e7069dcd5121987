"""A block-sparse module whose layout changes between calls computes with the new layout, never a stale plan.

The layout can change three ways: ``m.block_layout = new``, an in-place edit of the layout
tensor, and ``m.pattern = other`` (checked like the constructor's argument).
"""

from __future__ import annotations

import pytest
import torch

from ring_blocksparse import BlockSparseRingDilatedAttention, Pattern, build_pattern
from ring_core import reference_attention

N, H, BLOCK = 24, 2, 4
CONFIG = {"segment_lengths": [8, 24], "dilation_rates": [1, 2]}


def _inputs():
    generator = torch.Generator().manual_seed(3)
    return tuple(torch.randn(2, N, H, 4, generator=generator, dtype=torch.float64) for _ in range(3))


def _error(module, layout) -> float:
    q, k, v = _inputs()
    expected = reference_attention(q, k, v, **CONFIG, block_layout=layout, block_size=BLOCK)
    return float((module(q, k, v) - expected).abs().max())


def _module(method: str, **options) -> BlockSparseRingDilatedAttention:
    """The gather path, or the strip path on its CPU twin (the same tiles and rule as the fused kernel)."""
    module = BlockSparseRingDilatedAttention(**CONFIG, block_size=BLOCK, method=method, **options)
    module.sparse_kernel = "math"
    return module


def _random_layout(seed: int) -> torch.Tensor:
    return build_pattern("random", density=0.4, seed=seed).layout(N, BLOCK, H)


METHODS = pytest.mark.parametrize("method", ["gather", "flex"])


@METHODS
def test_an_assigned_block_layout_is_used(method):
    first, second = _random_layout(1), _random_layout(2)
    module = _module(method, block_layout=first)
    assert _error(module, first) < 1e-12
    module.block_layout = second
    assert _error(module, second) < 1e-12


@METHODS
def test_a_layout_edited_in_place_is_used(method):
    layout = _random_layout(1)
    module = _module(method, block_layout=layout)
    assert _error(module, layout.clone()) < 1e-12
    layout[:, :, 0] = ~layout[:, :, 0]  # the tensor the module holds
    assert _error(module, layout.clone()) < 1e-12


@METHODS
def test_an_assigned_pattern_is_used(method):
    module = _module(method, pattern="local_window", window=8)
    assert _error(module, build_pattern("local_window", window=8).layout(N, BLOCK, H)) < 1e-12
    module.pattern = build_pattern("strided", stride=8)
    assert _error(module, build_pattern("strided", stride=8).layout(N, BLOCK, H)) < 1e-12
    module.pattern = None  # every block
    assert _error(module, None) < 1e-12
    assert module.last_method == method


class _WrongShape(Pattern):
    name = "wrong_shape"

    def layout(self, seq_len, block_size, num_heads=1):
        return torch.ones(1, 2, 2, dtype=torch.bool)

    def describe(self):
        return "always 2x2 blocks"


def test_a_swapped_in_pattern_is_checked():
    module = BlockSparseRingDilatedAttention(**CONFIG, block_size=BLOCK, pattern="local_window", window=8)
    with pytest.raises(TypeError, match="pattern must be a registered pattern name, a Pattern or None, got 123"):
        module.pattern = 123
    with pytest.raises(ValueError, match="unknown block-sparse pattern 'nope'"):
        module.pattern = "nope"
    with pytest.raises(ValueError, match="this module has a pattern: set pattern = None"):
        module.block_layout = _random_layout(1)
    module.pattern = _WrongShape()
    with pytest.raises(ValueError, match=r"block_layout must have shape .* got \(1, 2, 2\)"):
        module(*_inputs())
    with pytest.raises(TypeError, match="block_layout must be a bool tensor"):
        BlockSparseRingDilatedAttention(**CONFIG, block_size=BLOCK).block_layout = torch.ones(1, 6, 6)


@METHODS
def test_under_inference_mode_a_pattern_and_a_layout_edited_in_place_are_used(method):
    """Under ``torch.inference_mode`` tensors count no versions: a pattern's layout, made in the call, and an explicit
    layout made there and edited in place between calls (its contents are compared instead) are used."""
    module = _module(method, pattern="random", density=0.4, seed=1)
    with torch.inference_mode():
        assert _error(module, _random_layout(1)) < 1e-12
        assert _error(module, _random_layout(1)) < 1e-12
        layout = _random_layout(2)
        module.pattern = None
        module.block_layout = layout
        assert _error(module, layout) < 1e-12
        layout.copy_(_random_layout(3))
        assert _error(module, _random_layout(3)) < 1e-12
