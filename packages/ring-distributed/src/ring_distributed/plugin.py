"""Entry point of ring-distributed in the ``ring_attention`` group."""

from __future__ import annotations

from collections.abc import Callable

from ring_core.plugin import hookimpl


@hookimpl
def register_implementations(register: Callable[..., None]) -> None:
    from ring_core.plugin import Implementation

    from .attention import RingDistributedDilatedAttention
    from .production import RingDilatedAttentionProduction

    register(
        Implementation(
            name="ring_distributed_dilated",
            cls=RingDistributedDilatedAttention,
            package="ring-distributed",
            description="exact dilated attention over a Ulysses (all-to-all) x ring (P2P) mesh, or all-gather",
            distributed=True,
            priority=0,  # "auto" keeps ring_dilated; pick this one by name (strategies, meshes)
        )
    )
    register(
        Implementation(
            name="ring_dilated_production",
            cls=RingDilatedAttentionProduction,
            package="ring-distributed",
            description="the ring hardened: checkpointing, reused buffers, timeouts, non-finite guard, determinism",
            distributed=True,
            priority=-1,
        )
    )
