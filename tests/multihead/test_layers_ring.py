"""The ring variants of the layers and LongNetLM on 2 gloo ranks equal one process (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch
from layer_cases import ring_cases, run_case
from mh_helpers import assert_close

from ring_core import shard_sequence

CASES = [("encoder", "zigzag"), ("decoder", "contiguous"), ("longnet", "zigzag")]
SHARDED = {"out", "dsrc", "dtgt"}  # per-token results: each rank holds its rows; the rest are summed over ranks


@pytest.mark.distributed
def test_two_ranks_equal_one_process():
    distributed_helpers = pytest.importorskip("distributed_helpers")
    per_rank = distributed_helpers.run_distributed(ring_cases, 2, CASES, timeout=300)
    for index, (name, layout) in enumerate(CASES):
        expected = {key: torch.from_numpy(value) for key, value in run_case(name).items()}
        results = [{key: torch.from_numpy(v) for key, v in rank[index].items()} for rank in per_rank]
        for rank, result in enumerate(results):
            rows = {
                key: shard_sequence(expected[key], layout, dim=1, rank=rank, world_size=2)
                for key in SHARDED & set(expected)
            }
            assert_close({"out": result["out"]}, {"out": rows.pop("out")}, tol=1e-10)
            assert_close({key: result[key] for key in rows}, rows, tol=1e-9)
        summed = {key: sum(r[key] for r in results) for key in expected.keys() - SHARDED}
        assert_close(summed, {key: expected[key] for key in summed}, tol=1e-9)
