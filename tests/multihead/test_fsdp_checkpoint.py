"""FSDP2 (fully_shard) and activation checkpointing (torch.utils.checkpoint) with the ring modules, on gloo.

Two ranks, each with its shard of the sequence: the ring inside FSDP2-sharded, checkpointed
modules gives every rank the matching rows of the single-process output, and the full
(FSDP2-summed) gradient of every parameter equals the single-process one.
"""

from __future__ import annotations

import pytest
import torch
from layer_cases import N, fsdp_checkpoint_cases, longnet, run_case, tokens
from mh_helpers import assert_close

from ring_core import shard_sequence


def test_activation_checkpointing_gives_the_same_gradients():
    plain, checkpointed = longnet(), longnet(checkpointing=True)
    weights = torch.randn(2, N, 31, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (plain, checkpointed):
        (model(tokens()) * weights).sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert_close(grads[1], grads[0], tol=0)  # the same operations, recomputed


@pytest.mark.distributed
def test_fsdp2_and_checkpointing_on_two_ranks_equal_one_process():
    distributed_helpers = pytest.importorskip("distributed_helpers")
    layout = "zigzag"
    per_rank = distributed_helpers.run_distributed(fsdp_checkpoint_cases, 2, layout, timeout=300)
    for name in ("longnet", "block"):
        expected = {key: torch.from_numpy(value) for key, value in run_case(name).items()}
        for rank, results in enumerate(per_rank):
            result = {key: torch.from_numpy(value) for key, value in results[name].items()}
            rows = {
                key: shard_sequence(expected[key], layout, dim=1, rank=rank, world_size=2)
                for key in ("out", "dx")
                if key in expected
            }
            assert_close({"out": result.pop("out")}, {"out": rows["out"]}, tol=1e-10)
            if "dx" in result:
                assert_close({"dx": result.pop("dx")}, {"dx": rows["dx"]}, tol=1e-9)
            assert_close(result, {key: expected[key] for key in result}, tol=1e-9)  # full gradients
            assert len(result) == len(expected) - 1 - ("dx" in expected)
