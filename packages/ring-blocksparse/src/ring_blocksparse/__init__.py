"""ring-blocksparse: exact block-sparse + dilated attention, a sparse ring, and named patterns."""

from __future__ import annotations

from importlib import metadata as _metadata

from .attention import BlockSparseRingDilatedAttention
from .functional import block_sparse_dilated_attention
from .gather import BlockSparseSchedule, CommStats
from .patterns import (
    DilatedSparse,
    GlobalLocal,
    LocalWindow,
    Pattern,
    Random,
    Strided,
    build_pattern,
    check_block_layout,
    registered_patterns,
)
from .plan import Plan, build_plan

try:
    __version__ = _metadata.version("ring-blocksparse")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BlockSparseRingDilatedAttention",
    "BlockSparseSchedule",
    "CommStats",
    "DilatedSparse",
    "GlobalLocal",
    "LocalWindow",
    "Pattern",
    "Plan",
    "Random",
    "Strided",
    "__version__",
    "block_sparse_dilated_attention",
    "build_pattern",
    "build_plan",
    "check_block_layout",
    "registered_patterns",
]
