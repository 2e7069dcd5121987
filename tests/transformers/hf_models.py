"""Small float64 transformers causal LMs built from configs (no downloads), and comparisons for the tests."""

from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

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
