"""ring-blocksparse: Exact block-sparse + dilated ring attention and its patterns."""

from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("ring-blocksparse")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
