"""``RingDilatedAttentionFlash``: ring dilated attention on the fast GPU kernels of this package.

Same arguments and semantics as ``ring_dilated`` (:class:`ring_core.RingDilatedAttention`).
With one process (no process group, or a group of one), or when every segment lies inside
one rank's shard (the ring would send nothing), it runs the fused single-device path of
:mod:`ring_flash.fused` on the local tensors; otherwise core's ring with the kernel
dispatch of this package. The kernel is the first registered backend that supports the
request (cuDNN on Hopper), unless ``kernel=`` or ``RING_ATTENTION_KERNEL`` forces one; on
the CPU the core kernels serve, exactly.
"""

from __future__ import annotations

import torch

from ring_core.plugin import (
    KernelRequest,
    RingComm,
    RingDilatedAttention,
    block_kernel,
    segments_within_shards,
)

from .fused import fused_dilated_attention


class RingDilatedAttentionFlash(RingDilatedAttention):
    """Exact LongNet dilated attention on fast kernels; sequence-parallel over a process group.

    ``attn(q, k, v, *, is_causal=False, key_padding_mask=None)`` on ``(B, N, H, D)``
    tensors (this rank's shard when the group has several processes), checked like
    :class:`ring_core.RingDilatedAttention` (errors naming this class).
    """

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        comm: RingComm,
    ) -> torch.Tensor:
        local = segments_within_shards(q.shape[1], comm.world_size, self.layout, self.segment_lengths)
        if dropout_p > 0 or not local:  # dropout: the engine's kernels; spanning segments: the ring
            return super().attend(
                q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p, comm=comm
            )
        comm.stats.calls += 1
        bound = block_kernel(
            q, k, request=self.request(q, k, is_causal, key_padding_mask), softmax_scale=self.softmax_scale,
            kernel=self.kernel,
        )  # fmt: skip
        out, _ = fused_dilated_attention(
            q, k, v, backend=bound.backend, scale=bound.scale,
            segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates, merge=self.merge,
            is_causal=is_causal, key_padding_mask=key_padding_mask,
        )  # fmt: skip
        return out

    @staticmethod
    def request(
        q: torch.Tensor, k: torch.Tensor, is_causal: bool = False, key_padding_mask: torch.Tensor | None = None
    ) -> KernelRequest:
        """What each kernel call of the fused path asks for: key/value heads are expanded per call, no GQA."""
        return KernelRequest.for_tensors(q, q, causal=is_causal, has_mask=key_padding_mask is not None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel!r}"
