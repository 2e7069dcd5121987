"""ring_transformers.enable on Llama, Mistral and Qwen2 built from configs: exact against transformers' sdpa."""

from __future__ import annotations

import json

import pytest
import torch
from hf_models import DENSE, FAMILIES, build, encoder, loss_and_grads, padding_mask, relative_error, tokens
from transformers import AttentionInterface, BloomConfig, BloomForCausalLM
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

import ring_transformers
from ring_core import reference_attention
from ring_transformers import RingTransformersError


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", ["dilated", "ring_dilated"])
def test_dense_config_matches_sdpa_logits_and_gradients(family, name):
    model = build(family)
    ids, mask = tokens(3, 29), padding_mask(3, 29)
    labels = ids.masked_fill(mask == 0, -100)
    ref_logits, ref_loss, ref_grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    ring_transformers.enable(model, name, **DENSE)
    assert model.config._attn_implementation == ring_transformers.ATTENTION_NAME
    logits, loss, grads = loss_and_grads(model, input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool()  # padded queries are never compared (their outputs are not used)
    assert relative_error(logits[keep], ref_logits[keep]) <= 1e-10
    assert relative_error(loss, ref_loss) <= 1e-10
    assert grads.keys() == ref_grads.keys()
    for param, grad in grads.items():
        assert relative_error(grad, ref_grads[param]) <= 1e-9, param
    ring_transformers.disable(model)
    assert model.config._attn_implementation == "sdpa"


def reference_forward(config):
    """An attention function computing ring_core.reference_attention with a dilated ``config``."""

    def forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        pad = None if attention_mask is None else attention_mask == 0
        out = reference_attention(q, k, v, **config, is_causal=True, key_padding_mask=pad, softmax_scale=scaling)
        return out, None

    return forward


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dilated_config_matches_the_reference(family):
    config = {"segment_lengths": [4, 8, 32], "dilation_rates": [1, 2, 4]}
    model = build(family)
    ids, mask = tokens(2, 37), padding_mask(2, 37)
    AttentionInterface.register("reference_for_tests", reference_forward(config))
    AttentionMaskInterface.register("reference_for_tests", flash_attention_mask)  # the 2-D padding mask
    model.set_attn_implementation("reference_for_tests")
    ref = model(ids, attention_mask=mask).logits
    dense = build(family)
    ring_transformers.enable(dense, "dilated", **DENSE)
    ring_transformers.enable(model, "dilated", **config)
    logits = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert relative_error(logits[keep], ref[keep]) <= 1e-10
    assert relative_error(dense(ids, attention_mask=mask).logits[keep], ref[keep]) > 1e-3  # the config matters


def test_options_stay_out_of_the_saved_config(tmp_path):
    model = build("llama")
    ids = tokens(1, 19)
    expected = model(ids).logits
    ring_transformers.enable(model, "dilated", segment_lengths=[8, 16], dilation_rates=[1, 2])
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    text = json.dumps(saved)
    assert "ring" not in text and "segment_lengths" not in text and "dilation" not in text
    reloaded = type(model).from_pretrained(tmp_path, attn_implementation="sdpa", dtype=torch.float64).eval()
    assert relative_error(reloaded(ids).logits, expected) == 0


def test_dropout_comes_from_the_model():
    model = build("qwen2", attention_dropout=0.5)
    ids = tokens(2, 17)
    expected = model(ids).logits  # eval: no dropout
    ring_transformers.enable(model, "dilated", **DENSE)
    assert relative_error(model(ids).logits, expected) <= 1e-10
    model.train()
    torch.manual_seed(0)
    assert relative_error(model(ids).logits, expected) > 1e-3


def test_unsupported_models():
    with pytest.raises(RingTransformersError, match="must be a transformers PreTrainedModel"):
        ring_transformers.enable(torch.nn.Linear(2, 2), "dilated", **DENSE)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=11, hidden_size=8, n_layer=1, n_head=2))
    with pytest.raises(RingTransformersError, match="BloomForCausalLM does not compute attention through"):
        ring_transformers.enable(bloom, "dilated", **DENSE)
    chunked = build("llama")
    chunked.config.attention_chunk_size = 8
    with pytest.raises(RingTransformersError, match="chunked attention"):
        ring_transformers.enable(chunked, "dilated", **DENSE)
    doge = encoder("doge")  # its layers mask their keys by a mask computed from the hidden states
    with pytest.raises(RingTransformersError, match="DogeModel's attention uses a dynamic mask"):
        ring_transformers.enable(doge, "dilated", **DENSE)


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("dilated", {"segment_lengths": [8, 4], "dilation_rates": [1, 1]}, "strictly increasing"),
        ("dilated", {**DENSE, "window": 3}, r"rejects the options \['dilation_rates', 'segment_lengths', 'window'\]"),
        ("dilated", {**DENSE, "softmax_scale": 0.5}, "softmax_scale=0.5 is set by the model"),
        ("dilated", {**DENSE, "dropout": 0.1}, "dropout=0.1 is set by the model"),
        ("no_such_attention", DENSE, "unknown attention implementation 'no_such_attention'"),
        ("multihead_dilated", DENSE, "is a multihead implementation"),
        ("auto", DENSE, "name must be a registered attention implementation"),
    ],
)
def test_rejected_names_and_options(name, options, match):
    model = build("llama")
    with pytest.raises(RingTransformersError, match=match):
        ring_transformers.enable(model, name, **options)
    assert model.config._attn_implementation == "sdpa"  # nothing changed


def test_inputs_it_cannot_express():
    model = ring_transformers.enable(build("mistral"), "dilated", **DENSE)
    ids = tokens(1, 11)
    custom = torch.ones(1, 1, 11, 11, dtype=torch.bool).tril()
    with pytest.raises(RingTransformersError, match="4-D attention_mask"):
        model(ids, attention_mask=custom)
    with pytest.raises(RingTransformersError, match="key/value cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    with pytest.raises(RingTransformersError, match="not enabled in this process"):
        build("llama", attn_implementation=ring_transformers.ATTENTION_NAME)(ids)
    with pytest.raises(RingTransformersError, match="was not enabled"):
        ring_transformers.disable(build("llama"))


def test_mask_patterns_it_cannot_express():
    from transformers.masking_utils import create_causal_mask

    model = ring_transformers.enable(build("llama"), "dilated", **DENSE)
    embeds = torch.zeros(2, 12, 24, dtype=torch.float64)
    position_ids = torch.arange(12)[None]
    common = (model.config, embeds, None, None)  # config, inputs_embeds, attention_mask, no cache
    assert create_causal_mask(*common, position_ids) is None  # plain causal: nothing to build
    with pytest.raises(RingTransformersError, match="its own mask function"):
        create_causal_mask(*common, position_ids, or_mask_function=lambda b, h, q, kv: kv < 3)
    blocks = torch.tensor([[-1, -1, 0, 0, 0, -1, -1, -1, 1, 1, -1, -1]] * 2)  # bidirectional blocks (image tokens)
    with pytest.raises(RingTransformersError, match="see later keys"):
        create_causal_mask(*common, position_ids, block_sequence_ids=blocks)


def test_docs_example_runs(capsys):
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parents[2] / "docs" / "examples" / "transformers_enable.py"))
    lines = capsys.readouterr().out.strip().splitlines()
    assert float(lines[0].split(": ")[1]) <= 1e-12 and lines[1] == "(2, 300, 100)"


def test_sliding_window_matches_sdpa():
    model = build("mistral", sliding_window=6)  # Mistral's layers slide: each query sees its last 6 keys
    ids, mask = tokens(2, 21), padding_mask(2, 21)
    expected = model(ids, attention_mask=mask).logits
    ring_transformers.enable(model, "dilated", **DENSE)
    keep = mask.bool()
    assert relative_error(model(ids, attention_mask=mask).logits[keep], expected[keep]) <= 1e-10


def test_a_window_longer_than_the_sequence_is_no_window():
    model = build("mistral", sliding_window=32)
    ids = tokens(2, 21)
    expected = model(ids).logits
    ring_transformers.enable(model, "dilated", **DENSE)
    assert relative_error(model(ids).logits, expected) <= 1e-10


def test_the_models_window_and_a_window_option_conflict():
    model = build("mistral", sliding_window=6)
    with pytest.raises(RingTransformersError, match="window_size"):  # rejected by enable, or at the first call
        ring_transformers.enable(model, "dilated", **DENSE, window_size=(2, 2))
        model(tokens(1, 21))


def test_a_copied_model_stays_enabled_and_keeps_nothing_in_its_state():
    import copy

    model = ring_transformers.enable(build("llama"), "dilated", segment_lengths=[4, 8], dilation_rates=[1, 2])
    copied = copy.deepcopy(model)
    ids = tokens(1, 13)
    assert relative_error(copied(ids).logits, model(ids).logits) == 0.0
    assert set(copied.state_dict()) == set(build("llama").state_dict())
    ring_transformers.disable(copied)
    assert copied.config._attn_implementation == "sdpa" and model.config._attn_implementation == "ring_attention"


class Wrapped(torch.nn.Module):
    """A wrapper with PEFT's protocol (LoRA models): the transformers model it wraps from ``get_base_model()``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.base_model = model

    def get_base_model(self) -> torch.nn.Module:
        return self.base_model

    def forward(self, **inputs):
        return self.base_model(**inputs)


def test_a_wrapped_model_is_enabled_through_its_base_model():
    """``enable`` on a PEFT-style wrapper (``get_base_model()``) enables the model inside; ``disable`` undoes it."""
    ids = tokens(2, 17)
    expected = ring_transformers.enable(build("llama"), "dilated", segment_lengths=[4, 8], dilation_rates=[1, 2])
    wrapped = Wrapped(build("llama"))
    assert ring_transformers.enable(wrapped, "dilated", segment_lengths=[4, 8], dilation_rates=[1, 2]) is wrapped
    assert wrapped.base_model.config._attn_implementation == "ring_attention"
    assert relative_error(wrapped(input_ids=ids).logits, expected(input_ids=ids).logits) == 0.0
    ring_transformers.disable(wrapped)
    assert wrapped.base_model.config._attn_implementation == "sdpa"
    with pytest.raises(RingTransformersError, match="must be a transformers PreTrainedModel, got Wrapped"):
        ring_transformers.enable(Wrapped(torch.nn.Linear(2, 2)), "dilated", **DENSE)


def test_a_saved_model_loads_enabled_and_computes_the_same(tmp_path):
    """``torch.save`` of a whole model after a packed forward (the documents it read are not saved) and loaded back:
    enabled, the same logits."""
    model = ring_transformers.enable(build("llama"), "dilated", segment_lengths=[4, 8], dilation_rates=[1, 2])
    ids, positions = tokens(1, 20), torch.tensor([[*range(8), *range(12)]])
    logits = model(input_ids=ids, position_ids=positions).logits
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert loaded.config._attn_implementation == "ring_attention"
    assert relative_error(loaded(input_ids=ids, position_ids=positions).logits, logits) == 0.0


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "modernbert", "albert"])
def test_encoders_attend_both_ways_as_sdpa(family):
    """Bidirectional encoders (transformers' plain bidirectional mask): every key but padding, as sdpa, hidden states
    and every parameter's gradient (they were refused as a mask pattern of their own). ModernBERT's second layer is
    local: keys within 4 positions either side (``local_attention=8``), shorter than the sequence."""
    model = encoder(family, local_attention=8)
    if family == "modernbert":
        assert model.config.layer_types[:2] == ["full_attention", "sliding_attention"]
    ids, mask = tokens(2, 21).clamp(min=1), padding_mask(2, 21)
    keep = mask.bool()
    results = []
    for enabled in (False, True):
        if enabled:
            ring_transformers.enable(model, "dilated", **DENSE)
        model.zero_grad(set_to_none=True)
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state[keep]
        hidden.square().sum().backward()
        results.append((hidden.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (hidden, grads) = results
    assert relative_error(hidden, expected) <= 1e-10
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) <= 1e-9, name


def test_an_encoders_band_mask_must_be_the_band():
    """An encoder's sliding-window mask passes as the band that the layer's ``sliding_window`` brings only when the
    mask function is that band near the diagonal for every row: cut by packed documents, wider or narrower, it is
    refused (with padding, as without)."""
    from transformers.masking_utils import and_masks, sliding_window_bidirectional_mask_function

    from ring_transformers.attention import ring_attention_mask

    bidirectional = {"allow_is_bidirectional_skip": True, "local_size": 4}
    band = sliding_window_bidirectional_mask_function(4)
    padding = torch.ones(2, 21, dtype=torch.bool)
    assert ring_attention_mask(2, 21, 21, mask_function=band, **bidirectional) is None
    assert torch.equal(
        ring_attention_mask(2, 21, 21, mask_function=band, attention_mask=padding, **bidirectional), padding
    )
    documents = torch.tensor([[0] * 9 + [1] * 12, [0] * 21])  # the first row packs two documents

    def same_document(b, h, q, kv):
        return documents[b, q] == documents[b, kv]

    for other in (and_masks(band, same_document), sliding_window_bidirectional_mask_function(3),
                  sliding_window_bidirectional_mask_function(5)):  # fmt: skip
        with pytest.raises(RingTransformersError, match="not the band of 4 keys either side"):
            ring_attention_mask(2, 21, 21, mask_function=other, **bidirectional)


def autocast_loss_and_grads(model, **inputs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return loss_and_grads(model, **inputs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mixed_precision_under_autocast_as_sdpa(family):
    """A float32 model under ``torch.autocast`` (bf16; how a float32 model trains in mixed precision): its rotary
    embedding leaves the query and key in float32 and the value in bf16; attention takes them in bf16, as its sdpa does
    (autocast casts sdpa's inputs): logits, loss and gradients within twice sdpa's own distance from float32."""
    model = build(family).float()
    ids, mask = tokens(3, 29), padding_mask(3, 29)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    exact = loss_and_grads(model, **dict(inputs))
    sdpa = autocast_loss_and_grads(model, **dict(inputs))
    ring_transformers.enable(model, "dilated", **DENSE)
    ours = autocast_loss_and_grads(model, **dict(inputs))
    keep = mask.bool()
    assert ours[0].dtype == sdpa[0].dtype
    for got, ref, full in zip(ours[:2], sdpa[:2], exact[:2]):
        if got.dim():
            got, ref, full = got[keep], ref[keep], full[keep]
        assert relative_error(got.float(), full) <= 2 * relative_error(ref.float(), full) + 1e-6
    for name, grad in ours[2].items():
        limit = 2 * relative_error(sdpa[2][name], exact[2][name]) + 1e-6
        assert relative_error(grad, exact[2][name]) <= limit, name
