"""``tuned``: each block on the kernel measured fastest for its shape on this card.

Which kernel is fastest depends on the block: on an H200, flash-attn 4 beats cuDNN on long
dense blocks and loses on the short segments of dilated attention. This backend holds no
kernel of its own: for every call it looks the block's shape up in the card's measured
table (:mod:`ring_flash.kernel_table`) and calls the fastest kernel of that row that can
serve the request (GQA, dtype, installed libraries); forward and backward of one shape
pick the same kernel. Where no table matches the card (or the head dim, dtype), it declines
and dispatch falls back to the priority order.
"""

from __future__ import annotations

from functools import cache
from typing import ClassVar

import torch

from ring_core.plugin import KernelBackend, KernelRequest, get_registry

from .gpu_kernel import GPUKernel, _capability
from .kernel_table import TABLE_ENV, KernelTable, table_for

__all__ = ["TunedKernel"]


@cache
def _card() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


class TunedKernel(GPUKernel):
    """Per block shape, the kernel measured fastest on this card (``ring-attention info`` shows the table)."""

    name = "tuned"
    description = "per block shape, the kernel measured fastest on this card (table below)"
    # what it serves is what some measured kernel serves (checked per request)
    supports_gqa = supports_mask = supports_dropout = True
    priorities = (((8, 0), 120),)
    default_priority = 120

    _choices: ClassVar[dict[tuple[object, ...], KernelBackend]] = {}

    def table(self) -> KernelTable | None:
        card, capability = _card(), _capability()
        if card is None or capability is None:
            return None
        return table_for(card, capability)

    def availability_reasons(self) -> list[str]:
        reasons = super().availability_reasons()
        if reasons:
            return reasons
        try:
            table = self.table()
        except ValueError as exc:  # RING_FLASH_KERNEL_TABLE names a file that is not a table
            return [f"{TABLE_ENV}: {exc}"]
        if table is None:
            reasons.append(
                f"no measured kernel table for {_card()} (python -m tools.bench.kernel_table makes one; "
                f"{TABLE_ENV}=path uses it)"
            )
        return reasons

    def not_supported_reasons(self, request: KernelRequest) -> list[str]:
        reasons = super().not_supported_reasons(request)
        if request.window:
            reasons.append("sliding windows go to a kernel that takes them (the table measures none)")
        if reasons:
            return reasons
        table = self.table()
        assert table is not None  # (else availability_reasons gave a reason)
        dtype = str(request.dtype).replace("torch.", "")
        if dtype not in table.dtypes:
            reasons.append(f"dtype {dtype} not measured (table: {list(table.dtypes)})")
        if request.head_dim not in table.head_dims:
            reasons.append(f"head_dim {request.head_dim} not measured (table: {list(table.head_dims)})")
        if not any(r.causal == request.causal and r.head_dim == request.head_dim for r in table.rows):
            reasons.append(f"no measured row with causal={request.causal}")
        if not self._candidates(request, table):
            reasons.append(f"none of the measured kernels {list(table.kernels)} can serve it")
        return reasons

    @staticmethod
    def _candidates(request: KernelRequest, table: KernelTable) -> list[str]:
        kernels = get_registry().kernels
        return [n for n in table.kernels if n in kernels and n != TunedKernel.name and kernels[n].supports(request)]

    def choose(self, q: torch.Tensor, k: torch.Tensor, causal: bool, has_mask: bool) -> KernelBackend:
        """The kernel for this block (the same for its forward and backward)."""
        key = (q.device, q.dtype, q.shape[-1], q.shape[2], k.shape[2], causal, has_mask, q.shape[1], k.shape[1])
        backend = self._choices.get(key)
        if backend is None:
            backend = self._choices[key] = self._choose(q, k, causal, has_mask)
        return backend

    def _choose(self, q: torch.Tensor, k: torch.Tensor, causal: bool, has_mask: bool) -> KernelBackend:
        request = KernelRequest.for_tensors(q, k, causal=causal, has_mask=has_mask)
        table = self.table()
        reasons = self.not_supported_reasons(request)
        if reasons or table is None:
            raise RuntimeError(f"kernel 'tuned' cannot run {request.describe()}: " + "; ".join(reasons))
        row = table.row(request.head_dim, causal, q.shape[1], k.shape[1])
        allowed = self._candidates(request, table)
        name = (row.fastest(allowed) if row else None) or allowed[0]
        return get_registry().kernels[name]

    @classmethod
    def forget_choices(cls) -> None:
        """Drop the per-shape choices (after the table or the registered kernels changed)."""
        cls._choices.clear()

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`~ring_core.kernels.KernelBackend.forward` by the kernel the card's table names for the shape."""
        backend = self.choose(q, k, causal, mask is not None)
        return backend.forward(q, k, v, scale=scale, causal=causal, mask=mask, dropout_p=dropout_p, seed=seed)

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        *,
        scale: float,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        seed: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backend = self.choose(q, k, causal, mask is not None)
        return backend.backward(
            dout, q, k, v, out, lse, scale=scale, causal=causal, mask=mask, dropout_p=dropout_p, seed=seed
        )

    def details(self) -> list[str]:
        table = self.table()
        if table is None:
            return []
        return table.lines()
