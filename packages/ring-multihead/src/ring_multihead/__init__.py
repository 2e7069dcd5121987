"""ring-multihead: nn.MultiheadAttention drop-ins built on dilated and ring attention."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ring-multihead")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
