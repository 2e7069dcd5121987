"""Entry point of ring-blocksparse in the ``ring_attention`` group."""

from __future__ import annotations

from collections.abc import Callable

from ring_core.plugin import hookimpl


@hookimpl
def register_implementations(register: Callable[..., None]) -> None:
    from ring_core.plugin import Implementation

    from .attention import BlockSparseRingDilatedAttention

    register(
        Implementation(
            name="block_sparse_ring_dilated",
            cls=BlockSparseRingDilatedAttention,
            package="ring-blocksparse",
            description="dilated attention restricted to a block layout; skips empty tiles and unneeded K/V",
            distributed=True,
            priority=-10,  # never "auto": a pattern changes what is computed
            options={"block_size": 4},  # tiny blocks, so the conformance shapes cut across blocks
            bench_options={"block_size": 128},
        )
    )


@hookimpl
def register_patterns(register: Callable[..., None]) -> None:
    from .patterns import BUILTIN_PATTERNS

    for name, builder in BUILTIN_PATTERNS.items():
        register(name, builder)


@hookimpl
def register_commands(register: Callable[..., None]) -> None:
    from .cli import add_pattern_parser

    register("pattern", add_pattern_parser)
