"""Sequence parallelism: 2 and 3 gloo ranks, each with its shard (shard_batch), equal one process.

One case also shards the parameters with FSDP2 (``fully_shard``) and checkpoints every layer.

Logits (each rank's rows), the loss (the ranks' shares sum to it) and every parameter's
gradient (the ranks' contributions sum to it), float64, against the single-process model
with transformers' sdpa (dense configuration) or the same dilated configuration.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import (
    ALIGNED_LENGTHS,
    DENSE,
    build,
    causal_batch,
    loss_and_grads,
    packed_batch,
    packed_sequence_parallel_logits,
    relative_error,
    sequence_parallel_step,
)

import ring_transformers
from distributed_helpers import run_distributed
from ring_core import shard_sequence

pytestmark = pytest.mark.distributed

DILATED = {"segment_lengths": [4, 8, 16], "dilation_rates": [1, 2, 4]}
CASES = {
    2: [
        {"family": "llama", "layout": "contiguous", "config": DENSE, "seq_len": 26, "padded": True},
        {"family": "mistral", "layout": "zigzag", "config": DILATED, "seq_len": 24, "padded": False},
        {"family": "qwen2", "layout": "zigzag", "config": DENSE, "seq_len": 20, "padded": True},
        {"family": "llama", "layout": "zigzag", "config": DILATED, "seq_len": 24, "padded": True, "fsdp": True},
    ],
    3: [
        {"family": "qwen2", "layout": "contiguous", "config": DILATED, "seq_len": 27, "padded": True},
        {"family": "llama", "layout": "zigzag", "config": DENSE, "seq_len": 24, "padded": False},
    ],
}


def single_process(case: dict):
    model = build(case["family"])
    if case["config"] is not DENSE:
        ring_transformers.enable(model, "dilated", **case["config"])
    return loss_and_grads(model, **causal_batch(case["seq_len"], case["padded"]))


def check_ranks(world_size: int, per_rank: list[dict]) -> None:
    """Each rank's logits rows, the loss shares' sum and the gradients' sum against one process, every case."""
    cases = CASES[world_size]
    for index, case in enumerate(cases):
        logits, loss, grads = single_process(case)
        results = [rank_results["cases"][index] for rank_results in per_rank]
        for rank, result in enumerate(results):
            expected = shard_sequence(logits, case["layout"], dim=1, rank=rank, world_size=world_size)
            assert relative_error(torch.from_numpy(result["logits"]), expected) <= 1e-10, (case, rank)
            assert abs(result["total"] - loss.item()) <= 1e-10 * loss.item(), (case, rank)
        assert abs(sum(r["share"] for r in results) - loss.item()) <= 1e-10 * loss.item(), case
        assert abs(sum(r["model_loss"] for r in results) - loss.item()) <= 1e-5 * loss.item(), case  # float32
        for name, grad in grads.items():  # the ranks' contributions, or with FSDP2 their sum on every rank
            if case.get("fsdp"):
                assert all(relative_error(torch.from_numpy(r["grads"][name]), grad) <= 1e-9 for r in results), name
                continue
            summed = sum(torch.from_numpy(r["grads"][name]) for r in results)
            assert relative_error(summed, grad) <= 1e-9, (case, name)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    """One 2-rank run (spawning costs seconds) shared by the tests that read it."""
    return run_distributed(sequence_parallel_step, 2, CASES[2], timeout=300)


def test_two_ranks_equal_one_process(two_ranks):
    check_ranks(2, two_ranks)


def test_three_ranks_equal_one_process():
    check_ranks(3, run_distributed(sequence_parallel_step, 3, CASES[3], timeout=300))


def test_ranks_need_global_positions(two_ranks):
    messages = [result["default_positions_error"] for result in two_ranks]
    assert messages[0] == messages[1] and "pass the global positions of each rank's tokens" in messages[0]


def alone(model: torch.nn.Module, docs: list[list[int]]) -> torch.Tensor:
    return torch.cat([model(torch.tensor([doc])).logits for doc in docs], dim=1)


def test_encoders_are_not_sharded(two_ranks):
    """Encoders run on one process: sharded, their positions go unchecked (a forgotten position_ids, RoBERTa's
    positions counted from its padding index), so every rank refuses them alike."""
    errors = [result["encoder_error"] for result in two_ranks]
    assert errors[0] == errors[1] and errors[0][0] == "RingTransformersError", errors
    assert "attends both ways (an encoder)" in errors[0][1]


def test_packed_batch_over_two_ranks_equals_the_documents_alone():
    docs, _ = packed_batch()
    model = build("llama")
    expected = alone(model, docs)
    layouts = ("contiguous", "zigzag")
    results = run_distributed(packed_sequence_parallel_logits, 2, layouts)
    for rank, result in enumerate(results):
        for layout, logits in zip(layouts, result["logits"]):
            rows = shard_sequence(expected, layout, dim=1, rank=rank, world_size=2)
            assert relative_error(torch.from_numpy(logits), rows) <= 1e-10, (layout, rank)
    # documents that line up with the shards (every rank's positions 0..11) stay apart
    docs, _ = packed_batch(lengths=ALIGNED_LENGTHS)
    for rank, result in enumerate(results):
        assert relative_error(torch.from_numpy(result["aligned"]), alone(model, [docs[rank]])) <= 1e-10, rank
    # several packed rows cannot be sharded: the same error naming position_ids on every rank
    errors = [result["errors"]["rows"] for result in results]
    assert errors[0] == errors[1] and errors[0][0] == "ValueError", errors
    assert "must have batch size 1" in errors[0][1] and "position_ids" in errors[0][1]
    # so can they not with flash-attn's varlen keywords (rows end to end would not be the shards' order)
    errors = [result["errors"]["varlen_rows"] for result in results]
    assert errors[0] == errors[1] and errors[0][0] == "RingTransformersError", errors
    assert "must have batch size 1" in errors[0][1] and "cu_seq_lens_q" in errors[0][1]
    # a rank's own documents as cu_seq_lens: the whole sequence's are needed
    errors = [result["errors"]["local"] for result in results]
    assert errors[0] == errors[1] and errors[0][0] == "ValueError" and "cu_seqlens" in errors[0][1], errors


def test_shard_batch_shifts_labels_over_the_whole_sequence():
    batch = causal_batch(8, padded=False)
    shards = [ring_transformers.shard_batch(batch, layout="zigzag", rank=rank, world_size=2) for rank in range(2)]
    assert shards[0]["position_ids"].tolist() == [[0, 1, 6, 7]]
    assert shards[1]["position_ids"].tolist() == [[2, 3, 4, 5]]
    labels = batch["labels"]
    assert shards[0]["shift_labels"].tolist() == [[*row[1:3].tolist(), row[7].item(), -100] for row in labels]
    assert shards[1]["shift_labels"].tolist() == [row[3:7].tolist() for row in labels]
    assert all(shard["num_items_in_batch"].item() == 2 * 7 for shard in shards)
    with pytest.raises(ValueError, match=r"does not know how to shard \['pixel_values'\]"):
        ring_transformers.shard_batch({**batch, "pixel_values": torch.zeros(2, 3)}, rank=0, world_size=2)
