"""Entry point of ring-flash in the ``ring_attention`` group: kernels and ``ring_dilated_flash``."""

from __future__ import annotations

from collections.abc import Callable

from ring_core.plugin import Implementation, KernelBackend, aliases_for, hookimpl


@hookimpl
def register_kernels(register: Callable[[KernelBackend], None]) -> None:
    """The GPU backends, available or not (``ring-attention info`` lists the reasons)."""
    from .kernels import all_kernels

    for backend in all_kernels():
        register(backend)


@hookimpl
def register_implementations(register: Callable[[Implementation], None]) -> None:
    from . import DEPRECATED
    from .attention import RingDilatedAttentionFlash

    register(
        Implementation(
            name="ring_dilated_flash",
            cls=RingDilatedAttentionFlash,
            package="ring-flash",
            description="ring dilated attention on fast GPU kernels (cuDNN/flash/efficient SDPA, flash-attn)",
            aliases=aliases_for(DEPRECATED, "RingDilatedAttentionFlash"),
            distributed=True,
            devices=("cuda",),  # "auto" picks it on CUDA; it also runs on the CPU with the core kernels
            priority=20,
        )
    )
