"""ring-attention-example: a kernel backend and an attention implementation for ring-core."""

from __future__ import annotations

from ring_core.plugin import deprecated_getattr

from .attention import ExampleDilatedAttention
from .kernel import EinsumKernel

# Old name -> (new name, version of this package that removes the old name).
DEPRECATED = {"ExampleAttentionV1": ("ExampleDilatedAttention", "1.0.0")}

__getattr__ = deprecated_getattr(__name__, "ring-attention-example", DEPRECATED)

__all__ = ["DEPRECATED", "EinsumKernel", "ExampleDilatedAttention"]
