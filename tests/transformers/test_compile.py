"""``torch.compile(model, fullgraph=True)`` of an enabled transformers model: one graph, eager's numbers.

Compiled, nothing reads a value on the host: packed batches get a fixed-length ``cu_seqlens``
(``traced_cu_seqlens``, padded with empty documents), the mask check runs in the graph, and the
modules the layers use are built by ``enable``.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import DENSE, build, encoder, padding_mask, relative_error, tokens
from transformers import DataCollatorWithFlattening

import ring_transformers
from ring_transformers import cu_seqlens_from_position_ids
from ring_transformers.packing import traced_cu_seqlens

DILATED = {"segment_lengths": [2, 4, 8], "dilation_rates": [1, 2, 4]}


def compiled_model(family: str, config: dict, **overrides):
    torch._dynamo.reset()
    model = ring_transformers.enable(build(family, **overrides), "dilated", **config)
    return model, torch.compile(model, fullgraph=True, backend="aot_eager")


def test_traced_cu_seqlens_are_the_boundaries_padded_with_empty_documents():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [3, 4, 0, 1, 2, 3, 0, 1]])
    traced = traced_cu_seqlens(positions)
    assert traced.dtype == torch.int32 and traced.shape == (17,)
    values = traced.tolist()
    assert values == sorted(values) and values[0] == 0 and values[-1] == 16
    assert list(dict.fromkeys(values)) == cu_seqlens_from_position_ids(positions, flatten_rows=True).tolist()
    assert list(dict.fromkeys(traced_cu_seqlens(torch.arange(5)[None]).tolist())) == [0, 5]


@pytest.mark.parametrize(
    ("family", "config", "overrides"),
    [("llama", DENSE, {}), ("mistral", DILATED, {"sliding_window": 5})],
    ids=["llama-dense", "mistral-dilated-window"],
)
def test_compiled_model_is_one_graph_with_eager_logits_and_gradients(family, config, overrides):
    model, compiled = compiled_model(family, config, **overrides)
    ids = tokens(2, 13)
    explanation = torch._dynamo.explain(model)(ids, use_cache=False)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    expected = model(ids, use_cache=False).logits
    logits = compiled(ids, use_cache=False).logits
    assert relative_error(logits, expected) <= 1e-12
    params = list(model.parameters())
    grads = torch.autograd.grad(logits.square().sum(), params)
    for grad, ref in zip(grads, torch.autograd.grad(expected.square().sum(), params)):
        assert relative_error(grad, ref) <= 1e-10


def test_compiled_packed_rows_equal_the_documents_alone():
    model, compiled = compiled_model("llama", DILATED)
    generator = torch.Generator().manual_seed(2)
    docs = [torch.randint(0, 53, (n,), generator=generator).tolist() for n in (5, 9, 1, 7)]
    packed = DataCollatorWithFlattening()([{"input_ids": doc} for doc in docs])
    alone = torch.cat([model(torch.tensor([doc]), use_cache=False).logits for doc in docs], dim=1)
    logits = compiled(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    assert relative_error(logits, alone) <= 1e-10
    rows = packed["input_ids"].view(2, 11), packed["position_ids"].view(2, 11)  # two rows, a document across
    expected = model(input_ids=rows[0], position_ids=rows[1], use_cache=False).logits
    got = compiled(input_ids=rows[0], position_ids=rows[1], use_cache=False).logits
    assert relative_error(got, expected) <= 1e-10
    # flash-attn's varlen keywords: the documents as given, checked equal inside the graph
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": doc} for doc in docs])
    del batch["labels"]
    assert relative_error(compiled(**batch, use_cache=False).logits, alone) <= 1e-10
    batch["cu_seq_lens_k"] = batch["cu_seq_lens_k"].clone()
    batch["cu_seq_lens_k"][2] += 1
    with pytest.raises(RuntimeError, match="cu_seq_lens_q and cu_seq_lens_k differ"):
        compiled(**batch, use_cache=False)


def test_compiled_encoder_with_local_layers_is_one_graph_with_sdpas_numbers():
    """ModernBERT (a global and a local layer, keys within 4 positions either side), padded: one graph (its band is
    checked in the graph, its modules built at ``enable``), the hidden states and gradients of its own sdpa."""
    torch._dynamo.reset()
    model = encoder("modernbert", local_attention=8)
    ids, mask = tokens(2, 21).clamp(min=1), padding_mask(2, 21)
    keep = mask.bool()
    expected = model(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
    params = list(model.parameters())
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    ring_transformers.enable(model, "dilated", **DENSE)
    explanation = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    hidden = torch.compile(model, fullgraph=True, backend="aot_eager")(input_ids=ids, attention_mask=mask)
    hidden = hidden.last_hidden_state[keep]
    assert relative_error(hidden, expected) <= 1e-10
    for grad, ref in zip(torch.autograd.grad(hidden.square().sum(), params), expected_grads):
        assert relative_error(grad, ref) <= 1e-9


def test_compiled_packed_encoder_is_one_graph_with_sdpas_numbers():
    """BERT given packed ``position_ids``: its documents are read off its mask and checked in the graph; one graph,
    the hidden states and gradients of its own sdpa on the packed batch."""
    torch._dynamo.reset()
    model = encoder("bert")
    ids = tokens(2, 13).clamp(min=3)
    positions = torch.tensor([[*range(5), *range(8)], [*range(2, 15)]])  # a row of two documents, one of one
    expected = model(input_ids=ids, position_ids=positions).last_hidden_state
    params = [p for name, p in model.named_parameters() if not name.startswith("pooler")]
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    ring_transformers.enable(model, "dilated", **DENSE)
    explanation = torch._dynamo.explain(model)(input_ids=ids, position_ids=positions)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    hidden = compiled(input_ids=ids, position_ids=positions).last_hidden_state
    assert relative_error(hidden, expected) <= 1e-10
    scale = torch.stack([ref.norm() for ref in expected_grads]).norm()  # (a key bias's gradient is ~0)
    for grad, ref in zip(torch.autograd.grad(hidden.square().sum(), params), expected_grads):
        assert (grad - ref).norm() <= 1e-10 * scale


def test_compiled_under_autocast_is_one_graph_with_eagers_numbers():
    """A float32 Llama under ``torch.autocast`` (bf16, its query and key float32 after the rotary embedding, its value
    bf16): attention casts them as sdpa would, in the graph; compiled as eager, within bf16 rounding."""
    torch._dynamo.reset()
    model = ring_transformers.enable(build("llama").float(), "dilated", **DENSE)
    ids = tokens(2, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explanation = torch._dynamo.explain(model)(ids, use_cache=False)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
        expected = model(ids, use_cache=False).logits
        logits = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, use_cache=False).logits
    assert logits.dtype == expected.dtype == torch.bfloat16
    assert relative_error(logits.float(), expected.float()) <= 1e-2
