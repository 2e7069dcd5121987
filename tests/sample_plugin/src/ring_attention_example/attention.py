"""An attention implementation: a module with the ``attn(q, k, v, *, is_causal, key_padding_mask)`` forward."""

from __future__ import annotations

from collections.abc import Sequence

from ring_core.plugin import DilatedAttention

from .kernel import EinsumKernel


class ExampleDilatedAttention(DilatedAttention):
    """LongNet dilated attention whose blocks are all computed by :class:`EinsumKernel`.

    Same arguments and semantics as ``ring_core.DilatedAttention``; ring-core's
    engine does the gathering, the LSE merge and the backward.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        merge: str = "lse",
        softmax_scale: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(segment_lengths, dilation_rates, merge, softmax_scale, dropout, kernel=EinsumKernel.name)
