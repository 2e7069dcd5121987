"""ring-transformers: Hugging Face transformers models on ring-attention implementations.

- :func:`enable` switches every attention layer of a model to ``create_attention(name, **options)``
  through transformers' ``AttentionInterface`` (the model's code and saved config are untouched);
- packed batches (``position_ids`` restarting at 0) attend each document separately;
- :func:`shard_batch`, :func:`loss_share` and :func:`sum_over_ranks` run a model with its
  sequence sharded over a process group.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .attention import ATTENTION_NAME, RingTransformersError, disable, enable, ring_attention_forward
from .packing import cu_seqlens_from_position_ids
from .sequence_parallel import loss_share, shard_batch, shift_labels, sum_over_ranks

try:
    __version__ = _metadata.version("ring-transformers")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ATTENTION_NAME",
    "RingTransformersError",
    "__version__",
    "cu_seqlens_from_position_ids",
    "disable",
    "enable",
    "loss_share",
    "ring_attention_forward",
    "shard_batch",
    "shift_labels",
    "sum_over_ranks",
]
