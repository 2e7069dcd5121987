"""Entry point of ring-multihead in the ``ring_attention`` group."""

from __future__ import annotations

from collections.abc import Callable

from ring_core.plugin import hookimpl


@hookimpl
def register_implementations(register: Callable[..., None]) -> None:
    from ring_core.plugin import Implementation

    from .multihead import MultiheadDilatedAttention
    from .ring import RingMultiheadDilatedAttention

    register(
        Implementation(
            name="multihead_dilated",
            cls=MultiheadDilatedAttention,
            package="ring-multihead",
            description="nn.MultiheadAttention drop-in on dilated attention (masks, weights, MAGNETO)",
            kind="multihead",
            priority=0,
        )
    )
    register(
        Implementation(
            name="ring_multihead_dilated",
            cls=RingMultiheadDilatedAttention,
            package="ring-multihead",
            description="nn.MultiheadAttention drop-in, sequence sharded over a process group (ring)",
            kind="multihead",
            distributed=True,
            priority=0,
        )
    )
