"""Packed batches (DataCollatorWithFlattening): each document attends only to itself, as if run alone."""

from __future__ import annotations

import pytest
import torch
from hf_models import DENSE, build, relative_error
from transformers import DataCollatorWithFlattening

import ring_transformers
from ring_transformers import cu_seqlens_from_position_ids

LENGTHS = (7, 12, 1, 9)
DILATED = {"segment_lengths": [2, 4, 8], "dilation_rates": [1, 2, 4]}


def documents(seed: int = 3, lengths: tuple[int, ...] = LENGTHS) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 53, (n,), generator=generator).tolist() for n in lengths]


def pack(docs: list[list[int]]) -> dict[str, torch.Tensor]:
    return DataCollatorWithFlattening()([{"input_ids": doc} for doc in docs])


def test_cu_seqlens_from_position_ids():
    packed = pack(documents())
    assert packed["input_ids"].shape == (1, sum(LENGTHS))
    cu = cu_seqlens_from_position_ids(packed["position_ids"])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 7, 19, 20, 29]
    assert cu_seqlens_from_position_ids(torch.arange(5, 12)) is None  # one sequence, any start
    assert cu_seqlens_from_position_ids(torch.arange(6).expand(3, -1)) is None
    rows = torch.tensor([[0, 1, 0, 1], [4, 5, 0, 1]])
    with pytest.raises(ValueError, match=r"must have batch size 1 .* position_ids of shape \(2, 4\)"):
        cu_seqlens_from_position_ids(rows)
    # rows end to end: every row starts a document, wherever its positions start
    assert cu_seqlens_from_position_ids(rows, flatten_rows=True).tolist() == [0, 2, 4, 6, 8]


def alone(model: torch.nn.Module, docs: list[list[int]], starts: list[int] | None = None) -> torch.Tensor:
    """Each document's logits on its own (positions from ``starts[j]``, default 0), concatenated."""
    starts = starts or [0] * len(docs)
    out = [
        model(torch.tensor([d]), position_ids=torch.arange(s, s + len(d))[None]).logits for d, s in zip(docs, starts)
    ]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    ("family", "config", "overrides"),
    [
        ("llama", DENSE, {}),
        ("llama", DILATED, {}),
        ("mistral", DENSE, {"sliding_window": 4}),  # windows restart with every document too
        ("qwen2", DILATED, {}),
    ],
    ids=["dense", "dilated", "mistral-window", "qwen2-dilated"],
)
def test_packed_logits_and_gradients_equal_the_documents_alone(family, config, overrides):
    docs = documents()
    model = ring_transformers.enable(build(family, **overrides), "dilated", **config)
    expected = alone(model, docs)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(model.parameters()))
    packed = pack(docs)
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    assert relative_error(logits, expected) <= 1e-10
    grads = torch.autograd.grad(logits.square().sum(), list(model.parameters()))
    for (name, _), grad, ref in zip(model.named_parameters(), grads, expected_grads):
        assert relative_error(grad, ref) <= 1e-9, name


def test_packed_logits_equal_transformers_sdpa_on_the_packed_batch():
    """transformers' own packing detection (sdpa with a document mask, only without a cache) agrees with ours."""
    model = build("llama")
    inputs = {key: value for key, value in pack(documents()).items() if key != "labels"}
    expected = model(**inputs, use_cache=False).logits
    ring_transformers.enable(model, "dilated", **DENSE)
    logits = model(**inputs).logits
    assert relative_error(logits, expected) <= 1e-10


def test_several_packed_rows_equal_the_documents_alone():
    """B > 1 in one process: every row's documents alone, a row's first document from its own first position."""
    model = ring_transformers.enable(build("llama"), "dilated", **DILATED)
    first, second = documents(5, (4, 6, 3)), documents(6, (8, 5))
    ids = torch.tensor([first[0] + first[1] + first[2], second[0] + second[1]])
    positions = torch.tensor([[*range(4), *range(6), *range(3)], [*range(3, 11), *range(5)]])
    logits = model(input_ids=ids, position_ids=positions).logits
    assert relative_error(logits[0], alone(model, first)[0]) <= 1e-10
    assert relative_error(logits[1], alone(model, second, starts=[3, 0])[0]) <= 1e-10
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0  # padding at the end of the second row's last document
    padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    short = [second[0], second[1][:3]]
    assert relative_error(padded[1, :11], alone(model, short, starts=[3, 0])[0]) <= 1e-10
    assert relative_error(padded[0], logits[0]) <= 1e-10


def test_flash_attn_varlen_keywords_separate_the_documents():
    """``cu_seq_lens_q``/``_k`` alone (the collator's ``return_flash_attn_kwargs``, positions not restarting) are the
    documents, as in flash-attn's varlen path; unequal ones raise."""
    docs = documents()
    model = ring_transformers.enable(build("llama"), "dilated", **DILATED)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(
        [{"input_ids": doc} for doc in docs]
    )
    del batch["labels"]
    starts = [0, *torch.tensor(LENGTHS).cumsum(0)[:-1].tolist()]  # the positions each document has in the row
    expected = alone(model, docs, starts)
    assert relative_error(model(**batch).logits, expected) <= 1e-10
    batch["cu_seq_lens_k"] = batch["cu_seq_lens_k"].clone()
    batch["cu_seq_lens_k"][1] += 1
    with pytest.raises(ring_transformers.RingTransformersError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        model(**batch)
    del batch["cu_seq_lens_k"]
    with pytest.raises(ring_transformers.RingTransformersError, match=r"shapes \(5,\) and None"):
        model(**batch)
