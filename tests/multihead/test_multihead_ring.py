"""RingMultiheadDilatedAttention: one rank equals the single-device module; 2 gloo ranks equal its shards."""

from __future__ import annotations

import pytest
import torch
from mh_helpers import F64, assert_close, randn

from ring_multihead import MultiheadDilatedAttention, RingMultiheadDilatedAttention

E, H, N = 12, 4, 16
CASES = {
    # name: (constructor options, forward options, layout)
    "dilated-causal-pad": (
        {"segment_lengths": [4, 8], "dilation_rates": [1, 2]},
        {"is_causal": True, "pad": True},
        "contiguous",
    ),
    "zigzag-causal": ({"segment_lengths": [2, 16], "dilation_rates": [1, 4]}, {"is_causal": True}, "zigzag"),
    "dense-subln-seqfirst": ({"layer_norm": True, "batch_first": False}, {"pad": True}, "contiguous"),
    "head-groups": ({"segment_lengths": [4, 8], "dilation_rates": [2, 4], "merge": "head_groups"}, {}, "zigzag"),
    "weights": (
        {"segment_lengths": [4, 8], "dilation_rates": [1, 2]},
        {"is_causal": True, "pad": True, "need_weights": True},
        "zigzag",
    ),
    "weights-bias-kv": (
        {"add_bias_kv": True, "add_zero_attn": True},
        {"pad": True, "need_weights": True},
        "contiguous",
    ),
    # a float mask of general values on rank 0's shard only (rank 1's holds 0 / -inf): the ranks once took different
    # paths (a gloo abort or a hang) or gathered masks of two kinds (wrong numbers)
    "float-mask-one-rank": ({}, {"pad": "float"}, "contiguous"),
    "float-mask-one-rank-weights": (
        {"segment_lengths": [4, 8], "dilation_rates": [1, 2]},
        {"pad": "float", "need_weights": True},
        "contiguous",
    ),
    "packed-window": (  # documents [0, 5), [5, 11), [11, 16) cross the shards of both layouts
        {"segment_lengths": [4, 8], "dilation_rates": [1, 2], "window_size": (3, 0)},
        {"is_causal": True, "batch": 1, "cu_seqlens": torch.tensor([0, 5, 11, 16])},
        "zigzag",
    ),
}


def build(cls, options, **extra):
    torch.manual_seed(0)
    module = cls(E, H, dtype=F64, **{"batch_first": True, **options}, **extra)
    if module.norm is not None:
        torch.nn.init.normal_(module.norm.weight)
    return module


def run_case(module, inputs, mask, forward, grad_out, grad_weights):
    leaves = [x.clone().requires_grad_() for x in inputs]
    module.zero_grad(set_to_none=True)
    out, weights = module(*leaves, key_padding_mask=mask, average_attn_weights=False, **forward)
    loss = (out * grad_out).sum() + (0 if weights is None else (weights * grad_weights).sum())
    loss.backward()
    result = {"out": out.detach(), **{f"d{i}": x.grad for i, x in enumerate(leaves)}}
    result.update({f"d{name}": p.grad for name, p in module.named_parameters()})
    if weights is not None:
        result["weights"] = weights.detach()
    return result


def ring_worker(rank: int, world_size: int) -> dict[str, str]:
    """Every case on this rank; returns {case: error message} for the failures."""
    from ring_core.sharding import shard_sequence

    failures = {}
    for name, (options, forward, layout) in CASES.items():
        forward = dict(forward)
        pad = forward.pop("pad", False)
        batch = forward.pop("batch", 2)
        forward.setdefault("need_weights", False)
        batch_first = options.get("batch_first", True)
        seq_dim = 1 if batch_first else 0
        shape = (batch, N, E) if batch_first else (N, batch, E)
        inputs = [randn(*shape, seed=i) for i in range(3)]
        mask = None
        if pad == "float":
            mask = torch.zeros(batch, N, dtype=F64)
            mask[:, 1], mask[:, N - 2] = 0.5, float("-inf")
        elif pad:
            mask = torch.rand(batch, N, generator=torch.Generator().manual_seed(9)) < 0.3
            mask[:, 0] = False
        grad_out = randn(*shape, seed=5)
        extra_keys = int(options.get("add_bias_kv", False)) + int(options.get("add_zero_attn", False))
        grad_weights = randn(batch, H, N, N + extra_keys, seed=6)
        single = build(MultiheadDilatedAttention, options)
        expected = run_case(single, inputs, mask, forward, grad_out, grad_weights)
        ring = build(RingMultiheadDilatedAttention, options, layout=layout)

        def local(x, dim=seq_dim, layout=layout):
            return None if x is None else shard_sequence(x, layout, dim=dim)

        actual = run_case(
            ring, [local(x) for x in inputs], local(mask, 1), forward, local(grad_out), local(grad_weights, 2)
        )
        for key in list(actual):
            if key.startswith("d") and key[1:] not in ("0", "1", "2"):  # parameter grads: this rank's part
                torch.distributed.all_reduce(actual[key])
        wanted = {key: local(value, seq_dim) for key, value in expected.items() if key in ("out", "d0", "d1", "d2")}
        wanted.update({key: value for key, value in expected.items() if key not in wanted})
        if "weights" in wanted:
            wanted["weights"] = local(expected["weights"], 2)
        try:
            assert_close(actual, wanted)
        except AssertionError as error:
            failures[name] = str(error)
    failures.update(error_checks(rank))
    return failures


def error_checks(rank: int) -> dict[str, str]:
    """Bad input on one rank, or calls that differ, raise on every rank (nobody waits in a collective)."""
    ring = build(RingMultiheadDilatedAttention, {"segment_lengths": [4, 8], "dilation_rates": [1, 2]})
    x = randn(2, N // 2, E, seed=rank)
    good = torch.zeros(2, N // 2, dtype=torch.bool)
    cases = {
        "bad mask on rank 1": (
            {"key_padding_mask": good if rank == 0 else good[:, :3], "need_weights": False},
            "rejected their inputs" if rank == 0 else "key_padding_mask must have shape",
        ),
        "need_weights differs": ({"need_weights": rank == 0}, "calls differ: need_weights"),
        "attn_mask": ({"attn_mask": torch.ones(N // 2, N // 2, dtype=torch.bool).triu(1)}, "is_causal=True"),
    }
    failures = {}
    for name, (kwargs, match) in cases.items():
        try:
            ring(x, x, x, **kwargs)
            failures[name] = "no error"
        except ValueError as error:
            if match not in str(error):
                failures[name] = f"unexpected message: {error}"
    return failures


@pytest.mark.distributed
def test_two_gloo_ranks_equal_the_single_device_module():
    distributed_helpers = pytest.importorskip("distributed_helpers")
    results = distributed_helpers.run_distributed(ring_worker, 2)
    failures = {
        f"rank {rank}: {case}": message for rank, result in enumerate(results) for case, message in result.items()
    }
    assert not failures, failures


def test_one_rank_is_the_single_device_module():
    for options, forward, layout in CASES.values():
        batch = forward.get("batch", 2)
        forward = {k: v for k, v in forward.items() if k not in ("pad", "batch")}
        single = build(MultiheadDilatedAttention, options)
        ring = build(RingMultiheadDilatedAttention, options, layout=layout)
        shape = (batch, N, E) if options.get("batch_first", True) else (N, batch, E)
        x = randn(*shape, seed=1)
        expected = single(x, x, x, **forward)
        actual = ring(x, x, x, **forward)
        torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
        assert (actual[1] is None) == (expected[1] is None)


def test_process_group_without_distributed_is_an_error():
    ring = RingMultiheadDilatedAttention(E, H, process_group=object())
    x = torch.randn(N, 2, E)
    with pytest.raises(ValueError, match="process_group was given but torch.distributed is not initialised"):
        ring(x, x, x)
