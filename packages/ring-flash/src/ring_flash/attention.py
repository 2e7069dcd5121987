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
    OpCall,
    RingDilatedAttention,
    block_kernel,
    branches,
    group_rank_and_size,
    segments_within_shards,
)

from .fused import FusedPlan, fused_backward, fused_forward


class RingDilatedAttentionFlash(RingDilatedAttention):
    """Exact LongNet dilated attention on fast kernels; sequence-parallel over a process group.

    ``attn(q, k, v, *, is_causal=False, key_padding_mask=None, return_lse=False)`` on
    ``(B, N, H, D)`` tensors (this rank's shard when the group has several processes),
    checked like :class:`ring_core.RingDilatedAttention` (errors naming this class).
    """

    def _fused_plan(self, q, k, call: OpCall) -> FusedPlan | None:
        """The fused single-device path's plan, or None when the call needs the ring or dropout."""
        world_size = group_rank_and_size(self.process_group)[1]
        local = segments_within_shards(q.shape[1], world_size, self.layout, self.segment_lengths)
        if call.dropout_p > 0 or not local:  # dropout: the engine's kernels; spanning segments: the ring
            return None
        bound = block_kernel(
            q, k, request=self.request(q, k, call.causal, call.key_padding_mask), softmax_scale=self.softmax_scale,
            kernel=self.kernel,
        )  # fmt: skip
        return FusedPlan(
            bound.backend, bound.scale, branches(self.segment_lengths, self.dilation_rates, self.merge, q.shape[2]),
            call.causal, call.key_padding_mask,
        )  # fmt: skip

    def attention_forward(self, q, k, v, call: OpCall) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._fused_plan(q, k, call)
        if plan is None:
            return super().attention_forward(q, k, v, call)
        self.comm_stats.calls += 1
        return fused_forward(plan, q, k, v)

    def attention_backward(self, dout, q, k, v, out, lse, call: OpCall):
        plan = self._fused_plan(q, k, call)
        if plan is None:
            return super().attention_backward(dout, q, k, v, out, lse, call)
        return fused_backward(plan, dout, q, k, v, out, lse)

    @staticmethod
    def request(
        q: torch.Tensor, k: torch.Tensor, is_causal: bool = False, key_padding_mask: torch.Tensor | None = None
    ) -> KernelRequest:
        """What each kernel call of the fused path asks for: key/value heads are expanded per call, no GQA."""
        return KernelRequest.for_tensors(q, q, causal=is_causal, has_mask=key_padding_mask is not None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel!r}"
