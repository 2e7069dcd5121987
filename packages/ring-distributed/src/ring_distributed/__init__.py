"""ring-distributed: Ulysses x ring on 2-D meshes, RingDistributedDilatedAttention and RingDilatedAttentionProduction."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ring-distributed")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
