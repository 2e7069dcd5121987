import torch
from transformers import LlamaConfig, LlamaForCausalLM

import ring_transformers

config = LlamaConfig(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
)  # fmt: skip
model = LlamaForCausalLM(config).to(torch.float64).eval()
input_ids = torch.randint(0, 100, (2, 300))
attention_mask = torch.ones_like(input_ids)
attention_mask[0, 280:] = 0  # padding
# transformers' own sdpa attention
expected = model(input_ids, attention_mask=attention_mask).logits

# Dense configuration (one segment spans the sequence): sdpa's numbers.
ring_transformers.enable(
    model, "dilated", segment_lengths=[4096], dilation_rates=[1]
)
logits = model(input_ids, attention_mask=attention_mask).logits
difference = (logits - expected)[attention_mask.bool()].abs().max()
print(f"max difference to sdpa: {difference.item():.1e}")

# LongNet's dilated attention instead: same model and weights.
ring_transformers.enable(
    model, "dilated", segment_lengths=[64, 128, 256], dilation_rates=[1, 2, 4]
)
logits = model(input_ids, attention_mask=attention_mask).logits
print(tuple(logits.shape))
