"""The entry point of ring-attention-example in the ``ring_attention`` group.

ring-core loads this module once, lazily, and calls each hook with a
``register`` callback.
"""

from __future__ import annotations

from ring_core.plugin import Implementation, aliases_for, hookimpl


@hookimpl
def register_kernels(register):
    from .kernel import EinsumKernel

    register(EinsumKernel())


@hookimpl
def register_implementations(register):
    from . import DEPRECATED
    from .attention import ExampleDilatedAttention

    register(
        Implementation(
            name="example_dilated",
            cls=ExampleDilatedAttention,
            package="ring-attention-example",
            description="DilatedAttention computed by the example_einsum kernel",
            aliases=aliases_for(DEPRECATED, "ExampleDilatedAttention"),
            devices=("cpu",),
            priority=-10,  # never preferred by create_attention("auto")
        )
    )
