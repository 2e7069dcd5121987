"""ring-core: exact long-context attention for PyTorch.

The contract (SPEC.md), the plugin registry, the factory, the float64 reference,
the blockwise engine, ``DilatedAttention`` and ``RingDilatedAttention``.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from .arguments import describe_arguments
from .deprecation import aliases_for, deprecated_getattr, warn_deprecated
from .dilated import DilatedAttention, DilatedSchedule, dilated_attention
from .dispatch import KernelNotAvailableError, select_kernel
from .engine import Accumulator, BlockKernel, BlockSchedule, blockwise_attention
from .factory import (
    UnknownImplementationError,
    create_attention,
    create_multihead_attention,
    explain_auto,
    resolve_implementation,
)
from .hookspecs import hookimpl
from .kernels import CPUFlashKernel, KernelBackend, KernelRequest, MathKernel, merge_into
from .lse import merge_attention
from .reference import branch_counts, reference_attention
from .registry import (
    Implementation,
    get_registry,
    list_implementations,
    list_kernels,
    plugin_errors,
    reset_registry,
)
from .validation import check_dilated_config, check_qkv

try:
    __version__ = _metadata.version("ring-core")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Accumulator",
    "BlockKernel",
    "BlockSchedule",
    "CPUFlashKernel",
    "DilatedAttention",
    "DilatedSchedule",
    "Implementation",
    "KernelBackend",
    "KernelNotAvailableError",
    "KernelRequest",
    "MathKernel",
    "UnknownImplementationError",
    "__version__",
    "aliases_for",
    "blockwise_attention",
    "branch_counts",
    "check_dilated_config",
    "check_qkv",
    "create_attention",
    "create_multihead_attention",
    "deprecated_getattr",
    "describe_arguments",
    "dilated_attention",
    "explain_auto",
    "get_registry",
    "hookimpl",
    "list_implementations",
    "list_kernels",
    "merge_attention",
    "merge_into",
    "plugin_errors",
    "reference_attention",
    "reset_registry",
    "resolve_implementation",
    "select_kernel",
    "warn_deprecated",
]

# Sequence parallelism: the ring and the sharding helpers.
from .builtins import DEPRECATED_NAMES as _DEPRECATED_NAMES
from .ring import RingCommStats, RingConfigError, RingDilatedAttention, ring_dilated_attention
from .sharding import shard_positions, shard_ranges, shard_sequence
from .unshard import unshard_sequence

__all__ += [
    "RingCommStats",
    "RingConfigError",
    "RingDilatedAttention",
    "ring_dilated_attention",
    "shard_positions",
    "shard_ranges",
    "shard_sequence",
    "unshard_sequence",
]

# Deprecated names (FutureWarning naming the replacement and the removal version).
__getattr__ = deprecated_getattr(__name__, "ring-core", _DEPRECATED_NAMES)
