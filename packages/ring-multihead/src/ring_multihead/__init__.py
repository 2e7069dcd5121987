"""ring-multihead: nn.MultiheadAttention drop-ins built on dilated and ring attention."""

from __future__ import annotations

from importlib import metadata as _metadata

from .magneto import magneto_gamma, magneto_gamma_encoder_decoder
from .multihead import MultiheadDilatedAttention, dense_cross_attention, dilated_attention_with_extra_keys
from .ring import RingMultiheadDilatedAttention

try:
    __version__ = _metadata.version("ring-multihead")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "MultiheadDilatedAttention",
    "RingMultiheadDilatedAttention",
    "__version__",
    "dense_cross_attention",
    "dilated_attention_with_extra_keys",
    "magneto_gamma",
    "magneto_gamma_encoder_decoder",
]
