"""``RingDilatedAttentionFlash``: ring dilated attention on the fast GPU kernels of this package.

Same arguments and semantics as ``ring_dilated`` (:class:`ring_core.RingDilatedAttention`).
With one process (no process group, or a group of one) it runs the fused
single-device path of :mod:`ring_flash.fused`; with several it runs core's ring
with the kernel dispatch of this package. The kernel is the first registered
backend that supports the request (cuDNN on Hopper), unless ``kernel=`` or
``RING_ATTENTION_KERNEL`` forces one; on the CPU the core kernels serve, exactly.
"""

from __future__ import annotations

import torch

from ring_core.dilated import dilated_attention
from ring_core.kernels import KernelRequest, default_scale
from ring_core.registry import select_kernel
from ring_core.ring import RingDilatedAttention
from ring_core.sharding import group_rank_and_size
from ring_core.validation import check_qkv

from .fused import fused_dilated_attention


class RingDilatedAttentionFlash(RingDilatedAttention):
    """Exact LongNet dilated attention on fast kernels; sequence-parallel over a process group.

    ``attn(q, k, v, *, is_causal=False, key_padding_mask=None)`` on ``(B, N, H, D)``
    tensors (this rank's shard when the group has several processes: then it is
    :class:`ring_core.RingDilatedAttention`'s forward, errors naming this class).
    """

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if group_rank_and_size(self.process_group)[1] > 1:
            return super().forward(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask)
        dropout_p = self.dropout if self.training else 0.0
        config = {
            "segment_lengths": self.segment_lengths, "dilation_rates": self.dilation_rates, "merge": self.merge,
            "is_causal": is_causal, "key_padding_mask": key_padding_mask,
        }  # fmt: skip
        if dropout_p > 0:  # dropout: the generic engine (kernels with dropout)
            return dilated_attention(
                q, k, v, softmax_scale=self.softmax_scale, dropout_p=dropout_p, kernel=self.kernel, **config
            )
        check_qkv(q, k, v, key_padding_mask)
        backend = select_kernel(self.request(q, k, is_causal, key_padding_mask), self.kernel)
        scale = default_scale(q.shape[-1], self.softmax_scale)
        out, _ = fused_dilated_attention(q, k, v, backend=backend, scale=scale, **config)
        return out

    @staticmethod
    def request(
        q: torch.Tensor, k: torch.Tensor, is_causal: bool = False, key_padding_mask: torch.Tensor | None = None
    ) -> KernelRequest:
        """What each kernel call of the fused path asks for: key/value heads are expanded per call, no GQA."""
        return KernelRequest.for_tensors(q, q, causal=is_causal, has_mask=key_padding_mask is not None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel!r}"
