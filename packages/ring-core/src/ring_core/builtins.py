"""ring-core's own kernels and implementations, registered through the same hooks as plugins."""

from __future__ import annotations

from .hookspecs import hookimpl
from .kernels import CPUFlashKernel, MathKernel


@hookimpl
def register_kernels(register):
    register(CPUFlashKernel())
    register(MathKernel())


@hookimpl
def register_implementations(register):
    from .dilated import DilatedAttention
    from .registry import Implementation

    register(
        Implementation(
            name="dilated",
            cls=DilatedAttention,
            package="ring-core",
            description="LongNet dilated attention on one device (blockwise engine, LSE merge)",
            priority=0,
        )
    )
