"""Bad or extreme inputs to every registered implementation: a clear error naming the parameter, or the right result.

Each of these once crashed deep inside (ZeroDivisionError, an aten message, difflib, a
constructor TypeError, TorchScript's ``unordered_map::at``) or effectively hung.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import ring_core

IMPLEMENTATIONS = [impl for impl in ring_core.list_implementations("attention") if impl.available]
CONFIG = {"segment_lengths": [8], "dilation_rates": [1]}


def _build(impl, **extra):
    return ring_core.create_attention(impl.name, **{**CONFIG, **extra}, **impl.options)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_bad_shapes_and_scales_are_named(impl):
    attn = _build(impl)
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    empty = torch.randn(1, 8, 2, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"head dim D of q, k, v must be at least 1"):
        attn(empty, empty, empty)
    with pytest.raises(ValueError, match=r"v must have the head dim D of q and k .* got 6 and 4"):
        attn(q, q, torch.randn(1, 8, 2, 6, dtype=torch.float64))
    for scale in ("abc", float("nan"), True):
        with pytest.raises(ValueError, match="softmax_scale must be a finite number or None"):
            _build(impl, softmax_scale=scale)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_switch_options_take_only_true_or_false(impl):
    """Every ``bool`` constructor option refuses a truthy string: ``deterministic="false"`` once meant True."""
    switches = [
        name
        for name, parameter in inspect.signature(impl.cls.__init__).parameters.items()
        if parameter.annotation in (bool, "bool")
    ]
    for name in switches:
        for value in ("false", None, 1):
            with pytest.raises(TypeError, match=f"{name} must be True or False, got {value!r}"):
                _build(impl, **{name: value})


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # shape checks are constants in a trace
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_jit_trace_records_the_attention(impl):
    """Traced (TorchScript), every implementation gives eager's result on new values (it once failed deep
    inside TorchScript with ``unordered_map::at``)."""
    q = torch.randn(1, 8, 2, 4)
    attn = _build(impl)
    traced = torch.jit.trace(attn, (q, q, q), check_trace=False)
    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    torch.testing.assert_close(traced(q, k, v), attn(q, k, v), rtol=0, atol=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_a_huge_dilation_rate_costs_no_more_than_the_heads(impl):
    """Rate 2**40: only offsets that some head uses are visited (it was a Python loop over 2**40 offsets)."""
    q, k, v = (torch.randn(1, 12, 3, 4, dtype=torch.float64) for _ in range(3))
    config = {"segment_lengths": [4, 2**40], "dilation_rates": [1, 2**40]}
    out = _build(impl, **config)(q, k, v)
    torch.testing.assert_close(out, ring_core.reference_attention(q, k, v, **config), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 0, 2, 4), (0, 8, 2, 4)], ids=["no-positions", "no-batch"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.name)
def test_empty_inputs_give_empty_outputs_and_gradients(impl, shape):
    q, k, v = (torch.randn(*shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = _build(impl)(q, k, v, is_causal=True)
    assert out.shape == shape
    out.sum().backward()
    assert all(x.grad.shape == shape for x in (q, k, v))


def test_factory_names_and_device_hint():
    for name in (None, 123):
        with pytest.raises(TypeError, match="implementation name must be a str"):
            ring_core.create_attention(name)
    for device in ("cpu", "cuda"):  # a hint for "auto"; the attention modules hold no parameters
        assert isinstance(ring_core.create_attention("auto", device=device, **CONFIG), torch.nn.Module)
    assert isinstance(ring_core.create_attention("dilated", device="cpu", **CONFIG), ring_core.DilatedAttention)


def test_shard_sequence_checks_the_world_size():
    with pytest.raises(ValueError, match="world_size must be a positive int, got 0"):
        ring_core.shard_sequence(torch.zeros(1, 8, 1, 1), rank=0, world_size=0)
