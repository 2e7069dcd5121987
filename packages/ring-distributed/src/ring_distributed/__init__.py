"""ring-distributed: Ulysses x ring on 2-D meshes, RingDistributedDilatedAttention and RingDilatedAttentionProduction."""

from __future__ import annotations

from importlib import metadata as _metadata

from .attention import RingDistributedDilatedAttention
from .comm import BufferPool, CollectiveError
from .mesh import MeshGroups, MeshLayout, mesh_groups, mesh_layout, resolve_strategy
from .production import NonFiniteError, RingDilatedAttentionProduction

try:
    __version__ = _metadata.version("ring-distributed")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BufferPool",
    "CollectiveError",
    "MeshGroups",
    "MeshLayout",
    "NonFiniteError",
    "RingDilatedAttentionProduction",
    "RingDistributedDilatedAttention",
    "mesh_groups",
    "mesh_layout",
    "resolve_strategy",
]
