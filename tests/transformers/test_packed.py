"""Packed batches (DataCollatorWithFlattening): each document attends only to itself, as if run alone."""

from __future__ import annotations

import pytest
import torch
from hf_models import DENSE, build, encoder, relative_error
from torch.utils._python_dispatch import TorchDispatchMode
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


def encoder_and_sdpa(family: str, **inputs: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    """The encoder enabled (dense), and its sdpa's hidden states and parameter gradients on ``inputs``."""
    model = encoder(family)
    hidden = model(**inputs).last_hidden_state
    grads = torch.autograd.grad(hidden.square().sum(), list(model.parameters()), allow_unused=True)
    return ring_transformers.enable(model, "dilated", **DENSE), hidden, grads


def assert_hidden_and_grads(model, inputs, hidden, grads) -> torch.Tensor:
    got = model(**inputs).last_hidden_state
    assert relative_error(got, hidden) <= 1e-10
    params = list(model.parameters())
    scale = torch.stack([ref.norm() for ref in grads if ref is not None]).norm()  # (a key bias's gradient is ~0)
    for (name, _), grad, ref in zip(
        model.named_parameters(), torch.autograd.grad(got.square().sum(), params, allow_unused=True), grads
    ):
        assert (grad is None) == (ref is None), name
        assert grad is None or (grad - ref).norm() <= 1e-10 * scale, name
    return got


@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "xlm-roberta"])
def test_packed_encoders_equal_their_sdpa_and_the_documents_alone(family):
    """An encoder given packed ``position_ids`` and no ``attention_mask`` (BERT's family) cuts its bidirectional mask
    into documents (transformers: where the positions do not step by 1); they are the documents here too, hidden
    states and every gradient, two rows packed differently, one document starting from position 3."""
    docs = [d for d in documents(7, (5, 9, 4, 3, 11)) for d in [[max(t, 3) for t in d]]]
    ids = torch.tensor([docs[0] + docs[1], docs[2] + docs[3] + docs[4][:7]])
    positions = torch.tensor([[*range(5), *range(9)], [*range(4), *range(3, 6), *range(7)]])
    inputs = {"input_ids": ids, "position_ids": positions}
    model, hidden, grads = encoder_and_sdpa(family, **inputs)
    got = assert_hidden_and_grads(model, inputs, hidden, grads)
    pieces = [(0, 0, 5), (0, 5, 14), (1, 0, 4), (1, 4, 7), (1, 7, 14)]
    for row, start, end in pieces:
        one = model(input_ids=ids[row : row + 1, start:end], position_ids=positions[row : row + 1, start:end])
        assert relative_error(got[row, start:end], one.last_hidden_state[0]) <= 1e-10


@pytest.mark.parametrize(("family", "padded"), [("bert", True), ("distilbert", False), ("modernbert", False)])
def test_encoders_not_packed_by_their_sdpa_are_not_packed_here(family, padded):
    """With an ``attention_mask``, BERT attends across the documents its ``position_ids`` restart (its sdpa packs only
    without one); DistilBERT's and ModernBERT's masks take no positions: ring attention does the same."""
    ids = torch.tensor([documents(8, (16,))[0]]).clamp(min=3)
    inputs = {"input_ids": ids, "position_ids": torch.tensor([[*range(7), *range(9)]])}
    if padded:
        inputs["attention_mask"] = torch.ones_like(ids)
    model, hidden, grads = encoder_and_sdpa(family, **inputs)
    assert_hidden_and_grads(model, inputs, hidden, grads)


def test_an_encoders_packed_mask_must_be_whole_documents():
    """The mask interface reads an encoder's packed documents off its mask function and checks them whole: a
    document cut further (a band within it) is refused."""
    from ring_transformers.attention import PackedMask, ring_attention_mask

    document = torch.tensor([[0] * 6 + [1] * 9 + [2] * 2, [0] * 17])
    bidirectional = {"allow_is_bidirectional_skip": False}

    def same(b, h, q, kv):
        return document[b, q] == document[b, kv]

    packed = ring_attention_mask(2, 17, 17, mask_function=same, **bidirectional)
    assert isinstance(packed, PackedMask) and packed.padding is None
    assert packed.cu_seqlens.tolist() == [0, 6, 15, 17, 34]
    padding = torch.ones(2, 17, dtype=torch.bool)
    with_padding = ring_attention_mask(2, 17, 17, mask_function=same, attention_mask=padding, **bidirectional)
    assert torch.equal(with_padding.padding, padding)
    for cut in (lambda b, h, q, kv: same(b, h, q, kv) & ((q - kv).abs() <= 3), lambda b, h, q, kv: kv >= q):
        with pytest.raises(ring_transformers.RingTransformersError, match="not whole documents"):
            ring_attention_mask(2, 17, 17, mask_function=cut, **bidirectional)


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's values on the host (on a GPU, each waits for the device): scalar reads,
    ``nonzero`` and boolean indexing."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default) or bool_index:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads(model: torch.nn.Module, **inputs) -> int:
    with torch.no_grad(), HostReads() as reads:
        model(**inputs)
    return reads.count


@pytest.mark.parametrize("batch", ["positions", "packed positions", "varlen keywords", "packed encoder"])
def test_the_documents_are_read_once_per_forward_not_per_layer(batch):
    """Every layer of a forward gets the same ``position_ids`` / ``cu_seq_lens_*`` (or, for an encoder, the same packed
    mask): their documents are read on the host once, and the implementation is handed them on the host (a read
    that would wait for the device in every layer): a model of 4 layers reads no more often than one of 2."""
    docs = documents()
    if batch == "packed encoder":
        positions = torch.tensor([[*range(5), *range(9)]])
        inputs = {"input_ids": torch.tensor([documents(7, (14,))[0]]).clamp(min=3), "position_ids": positions}
        models = [encoder("bert", num_hidden_layers=layers) for layers in (2, 4)]
    else:
        collate = DataCollatorWithFlattening(return_flash_attn_kwargs=batch == "varlen keywords")
        inputs = {
            k: v
            for k, v in collate([{"input_ids": d} for d in docs]).items()
            if k in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k")
        }
        if batch == "positions":
            inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1])[None]
        models = [build("llama", num_hidden_layers=layers) for layers in (2, 4)]
    reads = [host_reads(ring_transformers.enable(model, "dilated", **DILATED), **inputs) for model in models]
    assert reads[0] == reads[1], reads


def test_documents_read_once_follow_their_tensor_edited_in_place():
    """A ``position_ids`` tensor edited in place between forwards is read again (its documents are not the old ones)."""
    docs = documents()
    model = ring_transformers.enable(build("llama"), "dilated", **DILATED)
    packed = pack(docs)
    positions = packed["position_ids"].clone()
    model(input_ids=packed["input_ids"], position_ids=positions)
    positions.copy_(torch.arange(positions.shape[1])[None])  # one sequence now
    whole = model(input_ids=packed["input_ids"], position_ids=positions).logits
    expected = model(input_ids=packed["input_ids"], position_ids=torch.arange(positions.shape[1])[None]).logits
    assert relative_error(whole, expected) <= 1e-12


def test_packed_under_inference_mode_equals_no_grad():
    """Under ``torch.inference_mode`` (a packed batch made there: tensors that count no versions), twice, each forward
    reads its documents and equals the one under ``no_grad``."""
    model = ring_transformers.enable(build("llama"), "dilated", **DILATED)
    packed = pack(documents())
    with torch.no_grad():
        expected = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    with torch.inference_mode():
        for positions in (packed["position_ids"].clone(), packed["position_ids"].clone()):
            got = model(input_ids=packed["input_ids"].clone(), position_ids=positions).logits
            assert relative_error(got, expected) <= 1e-12
        positions.copy_(torch.arange(positions.shape[1])[None])  # edited in place: one sequence now
        whole = model(input_ids=packed["input_ids"].clone(), position_ids=positions).logits
    with torch.no_grad():
        one = model(input_ids=packed["input_ids"], position_ids=torch.arange(positions.shape[1])[None]).logits
    assert relative_error(whole, one) <= 1e-12
