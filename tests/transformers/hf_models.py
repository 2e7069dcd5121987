"""Small float64 transformers causal LMs built from configs (no downloads), and comparisons for the tests."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distributed_helpers import raised

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
VOCAB = 53
# dense: one segment longer than every test sequence, rate 1 (SPEC.md: then exactly SDPA)
DENSE = {"segment_lengths": [256], "dilation_rates": [1]}


def build(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer model with grouped-query attention (6 query heads, 2 key/value heads), float64, eval mode."""
    config_cls, model_cls = FAMILIES[family]
    settings = {
        "vocab_size": VOCAB,
        "hidden_size": 24,
        "intermediate_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "attn_implementation": "sdpa",
        **overrides,
    }
    torch.manual_seed(seed)
    return model_cls(config_cls(**settings)).to(torch.float64).eval()


def encoder(family: str, **overrides: Any) -> torch.nn.Module:
    """A small float64 encoder (bidirectional attention) built from its config (``overrides``: more settings)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(family)
    small = {"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
             "dim": 24, "hidden_dim": 40, "n_layers": 2, "n_heads": 4, "vocab_size": 53, "pad_token_id": 0,
             **overrides}  # fmt: skip
    for key, value in small.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModel.from_config(config, attn_implementation="sdpa").to(torch.float64).eval()


def padding_mask(batch: int, seq_len: int) -> torch.Tensor:
    """Row 0 right-padded, row 1 left-padded, the others whole."""
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[0, seq_len - 5 :] = 0
    mask[1, :4] = 0
    return mask


def tokens(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    assert torch.isfinite(value).all()
    return ((value - reference).norm() / reference.norm()).item()


def loss_and_grads(model: torch.nn.Module, **inputs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, a float64 causal-LM loss (mean over targets != -100) and every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    labels = inputs.pop("labels")
    logits = model(**inputs, use_cache=False).logits
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


def causal_batch(seq_len: int, padded: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows of ``seq_len`` tokens with labels; ``padded``: the first row ends with 5 padding tokens."""
    ids = tokens(2, seq_len, seed)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, seq_len - 5 :] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def sequence_parallel_step(rank: int, world_size: int, cases: list[dict]) -> dict[str, Any]:
    """In a gloo group: each case's model on this rank's shard (``shard_batch``); logits, loss shares, gradients.

    Also the error of a model fed every rank's ``0 .. n-1`` positions (no ``shard_batch``).

    Numpy arrays travel back (tensors would use shared memory that dies with the worker).
    """
    import ring_transformers

    results = []
    for case in cases:
        model = build(case["family"])  # the same seed: the same weights on every rank
        ring_transformers.enable(model, "ring_dilated", layout=case["layout"], **case["config"])
        if case.get("fsdp"):
            shard_and_checkpoint(model)
        batch = causal_batch(case["seq_len"], case["padded"])
        shard = ring_transformers.shard_batch(batch, None, case["layout"])
        inputs = {key: shard[key] for key in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**inputs, use_cache=False).logits
        share = ring_transformers.loss_share(logits, shard)
        share.backward()
        grads = {name: full(p.grad).numpy() for name, p in model.named_parameters()}
        with torch.no_grad():
            model_loss = model(**shard, use_cache=False).loss  # transformers' own loss (float32)
        results.append(
            {
                "logits": logits.detach().numpy(),
                "share": share.item(),
                "total": ring_transformers.sum_over_ranks(share).item(),
                "model_loss": model_loss.item(),
                "grads": grads,
            }
        )
    return {
        "cases": results,
        "default_positions_error": default_positions_error(rank),
        "encoder_error": raised(lambda: encoder_on_ranks(rank)),
    }


def encoder_on_ranks(rank: int) -> None:
    """An encoder (BERT) sharded over the group: refused (its positions could not be checked across ranks)."""
    import ring_transformers

    model = ring_transformers.enable(encoder("bert"), "ring_dilated", **DENSE)
    model(input_ids=tokens(1, 8, seed=rank).clamp(min=1))


def shard_and_checkpoint(model: torch.nn.Module) -> None:
    """FSDP2 over every decoder layer and the model, gradients summed (each rank has a loss share), checkpointing."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model.train()  # transformers checkpoints only in training mode (the models have no dropout)
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name (transformers >= 5.2x)
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    assert model.is_gradient_checkpointing
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no AVG / PREMUL_SUM


def full(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as a plain tensor: the whole (summed) gradient when FSDP2 shards it."""
    return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


def default_positions_error(rank: int) -> str:
    """The message a sharded model gives when every rank passes positions 0..n-1 (no shard_batch)."""
    import ring_transformers

    model = ring_transformers.enable(build("llama"), "ring_dilated", **DENSE)
    try:
        model(tokens(1, 8, seed=rank))
    except ring_transformers.RingTransformersError as exc:
        return str(exc)
    return "no error"


PACKED_LENGTHS = (5, 11, 3, 5)  # documents crossing the shard boundaries of 2 ranks in both layouts
ALIGNED_LENGTHS = (12, 12)  # one document per shard of 2 contiguous ranks: every rank's positions are 0..11


def packed_batch(seed: int = 4, lengths: tuple[int, ...] = PACKED_LENGTHS) -> tuple[list[list[int]], dict[str, Any]]:
    """Documents and their packed batch (``DataCollatorWithFlattening``: one row, positions restart at 0)."""
    from transformers import DataCollatorWithFlattening

    generator = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    return docs, DataCollatorWithFlattening()([{"input_ids": doc} for doc in docs])


def packed_sequence_parallel_logits(rank: int, world_size: int, layouts: tuple[str, ...]) -> dict[str, Any]:
    """This rank's logits of the packed batch per layout, sharded with its global (restarting) position ids.

    Also the logits of documents that line up with the contiguous shards (every rank's positions ``0 .. n-1``, told
    apart from a missing ``position_ids`` by the ``cu_seq_lens_q``/``_k`` that ``shard_batch`` adds), and the errors
    of a packed batch of two rows (rows end to end would break the sharding) and of the shard's own documents as
    ``cu_seq_lens_q``/``_k`` (they must be the whole sequence's).
    """
    import ring_transformers

    def logits_of(batch: dict[str, Any], layout: str, keys: tuple[str, ...]) -> Any:
        model = ring_transformers.enable(build("llama"), "ring_dilated", layout=layout, **DENSE)
        shard = ring_transformers.shard_batch(batch, None, layout)
        return model(**{key: shard[key] for key in keys}).logits.detach().numpy()

    _, batch = packed_batch()
    positions_only = ("input_ids", "position_ids")  # the ranks gather the positions
    results = [logits_of(batch, layout, positions_only) for layout in layouts]
    _, aligned = packed_batch(lengths=ALIGNED_LENGTHS)
    aligned_logits = logits_of(aligned, "contiguous", (*positions_only, "cu_seq_lens_q", "cu_seq_lens_k"))
    errors = {}
    rows = {key: batch[key].expand(2, -1) for key in positions_only}
    errors["rows"] = raised(lambda: ring_transformers.shard_batch(rows, None, "contiguous"))
    varlen = ("cu_seq_lens_q", "cu_seq_lens_k")
    cu = ring_transformers.cu_seqlens_from_position_ids(rows["position_ids"], flatten_rows=True)  # both rows end to end
    rows_cu = {**rows, **dict.fromkeys(varlen, cu)}
    errors["varlen_rows"] = raised(lambda: logits_of(rows_cu, "contiguous", (*positions_only, *varlen)))
    local = {"cu_seq_lens_q": torch.tensor([0, 12], dtype=torch.int32)}  # this rank's 12 tokens, not the 24
    local["cu_seq_lens_k"] = local["cu_seq_lens_q"]
    errors["local"] = raised(lambda: logits_of({**aligned, **local}, "contiguous", (*positions_only, *local)))
    return {"logits": results, "aligned": aligned_logits, "errors": errors}
