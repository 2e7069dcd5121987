"""``RingDilatedAttentionFlash``: ring dilated attention on the fast GPU kernels of this package.

Same arguments and semantics as ``ring_dilated`` (:class:`ring_core.RingDilatedAttention`).
With one process (no process group, or a group of one), or when every segment lies inside
one rank's shard (the ring would send nothing), it runs the fused single-device path of
:mod:`ring_flash.fused` on the local tensors (packed documents: the kernel's own varlen
call, :mod:`ring_flash.varlen`, when it has one); otherwise core's ring with the kernel
dispatch of this package. The kernel is the first registered backend that supports the
request (cuDNN on Hopper), unless ``kernel=`` or ``RING_ATTENTION_KERNEL`` forces one; on
the CPU the core kernels serve, exactly.
"""

from __future__ import annotations

import dataclasses

import torch

from ring_core.plugin import (
    KernelBackend,
    KernelNotAvailableError,
    KernelRequest,
    OpCall,
    RingDilatedAttention,
    block_kernel,
    branches,
    group_rank_and_size,
    segments_within_shards,
    select_kernel,
)

from .fused import FusedPlan, fused_backward, fused_forward
from .varlen import VarlenPlan, varlen_backward, varlen_forward, varlen_plan


class RingDilatedAttentionFlash(RingDilatedAttention):
    """Exact LongNet dilated attention on fast kernels; sequence-parallel over a process group.

    ``attn(q, k, v, *, is_causal=False, key_padding_mask=None, return_lse=False)`` on
    ``(B, N, H, D)`` tensors (this rank's shard when the group has several processes),
    checked like :class:`ring_core.RingDilatedAttention` (errors naming this class). :attr:`last_path` says how the
    last call ran: ``"varlen <kernel>"`` (packed documents in one kernel call per branch offset),
    ``"segments <kernel>"`` (the fused single-device path), ``"ring"`` or ``"engine (dropout)"``.
    """

    last_path: str | None = None

    def _local_plan(self, q: torch.Tensor, k: torch.Tensor, call: OpCall) -> FusedPlan | VarlenPlan | None:
        """The single-device path's plan (varlen or fused), or None when the call needs the ring or dropout."""
        world_size = group_rank_and_size(self.process_group)[1]
        local = (call.documents is None or world_size == 1) and segments_within_shards(
            q.shape[1], world_size, self.layout, self.segment_lengths
        )
        # dropout, empty inputs: the engine's kernels; segments or documents spanning shards: the ring
        if call.dropout_p > 0 or not local or q.numel() == 0:
            self.last_path = "engine (dropout)" if call.dropout_p > 0 else "ring" if not local else "engine"
            return None
        windowed = self.window_size != (-1, -1)
        request = self.request(q, k, call.causal, call.key_padding_mask, window=windowed)
        branch_list = branches(self.segment_lengths, self.dilation_rates, self.merge, q.shape[2])
        if call.documents is not None and call.key_padding_mask is None:
            backend = _varlen_kernel(request, self.kernel)
            if backend is not None:
                self.last_path = f"varlen {backend.name}"
                bound = block_kernel(q, k, request=request, softmax_scale=self.softmax_scale, kernel=backend.name)
                return varlen_plan(
                    bound.backend, bound.scale, q, k, branch_list=branch_list, causal=call.causal,
                    window_size=self.window_size, documents=call.documents,
                )  # fmt: skip
        bound = block_kernel(q, k, request=request, softmax_scale=self.softmax_scale, kernel=self.kernel)
        self.last_path = f"segments {bound.backend.name}" + (", window" if windowed else "")
        return FusedPlan(
            bound.backend, bound.scale, branch_list, call.causal, call.key_padding_mask,
            window=self.window_size, documents=call.documents,
        )  # fmt: skip

    def attention_forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._local_plan(q, k, call)
        if plan is None:
            return super().attention_forward(q, k, v, call)
        self.comm_stats.calls += 1
        if isinstance(plan, VarlenPlan):
            return varlen_forward(plan, q, k, v)
        return fused_forward(plan, q, k, v)

    def attention_backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: OpCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        plan = self._local_plan(q, k, call)
        if plan is None:
            return super().attention_backward(dout, q, k, v, out, lse, call)
        if isinstance(plan, VarlenPlan):
            return varlen_backward(plan, dout, q, k, v, out, lse)
        return fused_backward(plan, dout, q, k, v, out, lse)

    @staticmethod
    def request(
        q: torch.Tensor,
        k: torch.Tensor,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        window: bool = False,
    ) -> KernelRequest:
        """What each kernel call of the fused path asks for: key/value heads are expanded per call, no GQA."""
        return KernelRequest.for_tensors(q, q, causal=is_causal, has_mask=key_padding_mask is not None, window=window)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel!r}"


def _varlen_kernel(request: KernelRequest, name: str | None) -> KernelBackend | None:
    """The kernel for packed documents in one call per branch offset, or None (then: one document at a time)."""
    try:
        return select_kernel(dataclasses.replace(request, varlen=True), name)
    except KernelNotAvailableError:
        return None
