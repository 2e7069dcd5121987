"""Packed batches (DataCollatorWithFlattening): each document attends only to itself, as if run alone."""

from __future__ import annotations

import pytest
import torch
from hf_models import CU_SEQLENS, DENSE, NEEDS_CORE, build, relative_error
from transformers import DataCollatorWithFlattening

import ring_transformers
from ring_transformers import RingTransformersError, cu_seqlens_from_position_ids

LENGTHS = (7, 12, 1, 9)


def documents(seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 53, (n,), generator=generator).tolist() for n in LENGTHS]


def test_cu_seqlens_from_position_ids():
    packed = DataCollatorWithFlattening()([{"input_ids": doc} for doc in documents()])
    assert packed["input_ids"].shape == (1, sum(LENGTHS))
    cu = cu_seqlens_from_position_ids(packed["position_ids"])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 19, 20, 29]
    assert cu_seqlens_from_position_ids(torch.arange(5, 12)) is None  # one sequence, any start
    assert cu_seqlens_from_position_ids(torch.arange(6).expand(3, -1)) is None
    with pytest.raises(ValueError, match="must have batch size 1"):
        cu_seqlens_from_position_ids(torch.tensor([[0, 1, 0, 1], [0, 1, 2, 3]]))


@pytest.mark.xfail(not CU_SEQLENS, strict=True, reason=NEEDS_CORE, raises=RingTransformersError)
@pytest.mark.parametrize(
    "config", [DENSE, {"segment_lengths": [2, 4, 8], "dilation_rates": [1, 2, 4]}], ids=["dense", "dilated"]
)
def test_packed_logits_and_gradients_equal_the_documents_alone(config):
    docs = documents()
    model = ring_transformers.enable(build("llama"), "dilated", **config)
    alone = []
    for doc in docs:
        alone.append(model(torch.tensor([doc])).logits)
    expected = torch.cat(alone, dim=1)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    packed = DataCollatorWithFlattening()([{"input_ids": doc} for doc in docs])
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    assert relative_error(logits, expected) <= 1e-10
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
    for (name, _), grad, ref in zip(model.named_parameters(), grads, expected_grads):
        assert relative_error(grad, ref) <= 1e-9, name


@pytest.mark.skipif(CU_SEQLENS, reason="this ring-core computes packed batches")
def test_packed_batches_need_cu_seqlens_in_core():
    model = ring_transformers.enable(build("llama"), "dilated", **DENSE)
    packed = DataCollatorWithFlattening()([{"input_ids": doc} for doc in documents()])
    with pytest.raises(RingTransformersError, match=NEEDS_CORE):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"])


def test_a_packed_batch_has_one_row():
    model = ring_transformers.enable(build("llama"), "dilated", **DENSE)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="must have batch size 1"):
        model(input_ids=torch.zeros(2, 6, dtype=torch.long), position_ids=positions)
