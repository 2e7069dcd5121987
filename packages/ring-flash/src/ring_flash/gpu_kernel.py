"""The base of this package's CUDA backends: what they support, declared as data, and their fused merges."""

from __future__ import annotations

from functools import cache
from typing import ClassVar

import torch

from ring_core.plugin import KernelBackend, KernelRequest

from .merge import installed, merge_block, online_merge

HALF_DTYPES = (torch.float16, torch.bfloat16)


@cache
def _capability() -> tuple[int, int] | None:
    """Compute capability of the current CUDA device (``None`` without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


class GPUKernel(KernelBackend):
    """Common capability data of the CUDA backends."""

    devices = ("cuda",)
    dtypes: ClassVar[tuple[torch.dtype, ...]] = HALF_DTYPES
    supports_mask = False
    supports_dropout = False
    supports_gqa: ClassVar[bool] = False
    head_dim_multiple: ClassVar[int] = 8
    max_head_dim: ClassVar[int | None] = 256
    min_compute_capability = (8, 0)
    max_compute_capability: ClassVar[tuple[int, int] | None] = None
    aten_ops: ClassVar[tuple[str, ...]] = ()
    module: ClassVar[str | None] = None  # optional library to import
    # priority by compute capability: the first entry whose capability <= the device's wins
    priorities: ClassVar[tuple[tuple[tuple[int, int], int], ...]] = ()
    default_priority: ClassVar[int] = 20

    @property
    def priority(self) -> int:  # type: ignore[override]
        capability = _capability()
        if capability is not None:
            for minimum, value in self.priorities:
                if capability >= minimum:
                    return value
        return self.default_priority

    def availability_reasons(self) -> list[str]:
        reasons = []
        if not torch.cuda.is_available():
            reasons.append("no CUDA device" if torch.version.cuda else "torch built without CUDA")
        for op in self.aten_ops:
            if not hasattr(torch.ops.aten, op):
                reasons.append(f"this torch ({torch.__version__}) has no aten.{op}")
        if self.module is not None and not installed(self.module.split(".")[0]):
            reasons.append(f"{self.module} is not installed ({self.install_hint})")
        return reasons

    install_hint: ClassVar[str] = ""

    def merge(
        self, out_acc: torch.Tensor, lse_acc: torch.Tensor, out_block: torch.Tensor, lse_block: torch.Tensor
    ) -> None:
        """One Triton pass where it applies (:func:`ring_flash.merge.online_merge`), else torch ops."""
        if not online_merge(out_acc, lse_acc, out_block, lse_block):
            super().merge(out_acc, lse_acc, out_block, lse_block)

    def accumulate(self, grad: torch.Tensor, block_grad: torch.Tensor) -> None:
        merge_block(grad, block_grad, accumulate=True)

    def not_supported_reasons(self, request: KernelRequest) -> list[str]:
        reasons = super().not_supported_reasons(request)
        if request.head_dim % self.head_dim_multiple:
            reasons.append(f"head_dim {request.head_dim} is not a multiple of {self.head_dim_multiple}")
        if request.num_kv_heads != request.num_heads and not self.supports_gqa:
            reasons.append(
                f"grouped-query attention ({request.num_heads} query / {request.num_kv_heads} kv heads) "
                "is not supported"
            )
        cc = request.compute_capability
        if cc is not None and self.max_compute_capability is not None and cc > self.max_compute_capability:
            reasons.append(f"compute capability {cc} > {self.max_compute_capability}")
        return reasons
