"""ring-flash: fast GPU kernels with LSE and ``RingDilatedAttentionFlash``.

Kernel backends (registered through ``register_kernels``): ``sdpa_cudnn``,
``sdpa_flash``, ``sdpa_efficient`` (PyTorch's fused attention through its aten
ops), when installed ``flash_attn2``, ``flash_attn3``, ``flash_attn4``, and ``tuned``
(per block shape, the kernel measured fastest on this card).
"""

from __future__ import annotations

from importlib import metadata as _metadata

from ring_core.plugin import deprecated_getattr

from .attention import RingDilatedAttentionFlash
from .fused import fused_dilated_attention
from .kernels import (
    FlashAttn2Kernel,
    FlashAttn3Kernel,
    FlashAttn4Kernel,
    SDPACuDNNKernel,
    SDPAEfficientKernel,
    SDPAFlashKernel,
    TunedKernel,
    all_kernels,
)

try:
    __version__ = _metadata.version("ring-flash")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

# Deprecated names: old -> (new, version that removes the old name).
DEPRECATED: dict[str, tuple[str, str]] = {
    "RingDilatedAttentionV2Flash": ("RingDilatedAttentionFlash", "0.3.0"),
}

__getattr__ = deprecated_getattr(__name__, "ring-flash", DEPRECATED)

__all__ = [
    "DEPRECATED",
    "FlashAttn2Kernel",
    "FlashAttn3Kernel",
    "FlashAttn4Kernel",
    "RingDilatedAttentionFlash",
    "SDPACuDNNKernel",
    "SDPAEfficientKernel",
    "SDPAFlashKernel",
    "TunedKernel",
    "__version__",
    "all_kernels",
    "fused_dilated_attention",
]
