"""ring-core's own kernels and implementations, registered through the same hooks as plugins."""

from __future__ import annotations

from collections.abc import Callable

from .deprecation import aliases_for
from .dilated import DilatedAttention
from .hookspecs import hookimpl
from .kernels import CPUFlashKernel, MathKernel
from .registry import Implementation
from .ring import RingDilatedAttention

__all__ = [
    "DEPRECATED_NAMES",
    "register_implementations",
    "register_kernels",
]

# Deprecated names of ring-core: {old: (new, removal version)}; served by ring_core.__getattr__ too.
DEPRECATED_NAMES = {"RingDilatedAttentionV2Collective": ("RingDilatedAttention", "0.3.0")}


@hookimpl
def register_kernels(register: Callable[..., None]) -> None:
    register(CPUFlashKernel())
    register(MathKernel())


@hookimpl
def register_implementations(register: Callable[..., None]) -> None:
    register(
        Implementation(
            name="dilated",
            cls=DilatedAttention,
            package="ring-core",
            description="LongNet dilated attention on one device (blockwise engine, LSE merge)",
            priority=0,
        )
    )
    register(
        Implementation(
            name="ring_dilated",
            cls=RingDilatedAttention,
            package="ring-core",
            description="exact ring attention (dense and dilated) over a torch.distributed group, P2P overlapped",
            aliases=aliases_for(DEPRECATED_NAMES, "RingDilatedAttention"),
            distributed=True,
            priority=1,
        )
    )
