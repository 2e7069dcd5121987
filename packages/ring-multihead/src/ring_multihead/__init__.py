"""ring-multihead: nn.MultiheadAttention and nn.Transformer*Layer drop-ins on dilated and ring attention, LongNetLM."""

from __future__ import annotations

from importlib import metadata as _metadata

from .convert import convert_state_dict
from .core import dense_cross_attention, dilated_attention_with_extra_keys
from .layers import DilatedTransformerDecoderLayer, DilatedTransformerEncoderLayer
from .longnet import LongNetLM
from .magneto import magneto_gamma, magneto_gamma_encoder_decoder
from .multihead import MultiheadDilatedAttention
from .ring import RingMultiheadDilatedAttention

try:
    __version__ = _metadata.version("ring-multihead")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "DilatedTransformerDecoderLayer",
    "DilatedTransformerEncoderLayer",
    "LongNetLM",
    "MultiheadDilatedAttention",
    "RingMultiheadDilatedAttention",
    "__version__",
    "convert_state_dict",
    "dense_cross_attention",
    "dilated_attention_with_extra_keys",
    "magneto_gamma",
    "magneto_gamma_encoder_decoder",
]
