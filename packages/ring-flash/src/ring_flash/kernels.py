"""GPU kernel backends that return the log-sum-exp and take any ``out``/``lse`` in backward.

- ``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``: PyTorch's fused attention
  through its aten ops (``_scaled_dot_product_cudnn_attention``,
  ``_flash_attention_forward``, ``_efficient_attention_forward`` and their
  backward ops), so no extra library is needed.
- ``flash_attn2`` (``flash_attn``), ``flash_attn3`` (``flash_attn_interface``) and
  ``flash_attn4`` (``flash_attn.cute``) when installed (:mod:`ring_flash.flash_attn`);
  otherwise listed with the reason.
- ``tuned`` (:mod:`ring_flash.tuned`): per block shape, the kernel measured fastest on
  this card, where a measured table exists for it; it is tried first.

Each backend declares what it supports as data (device, dtypes, head dims,
compute capability, masks, GQA, dropout) and ``not_supported_reasons`` rejects
anything else, so dispatch falls back to the next backend. Priorities order them
fastest first as benchmarked by ``tools/bench/flash_dilated.py`` (docs/benchmarks.md):
cuDNN, then the flash kernels, then memory-efficient; ``tuned`` refines that per block
shape.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from ring_core.plugin import KernelBackend, MathKernel, combined_mask, unit_last_stride

from .flash_attn import FlashAttn2Kernel, FlashAttn3Kernel, FlashAttn4Kernel
from .gpu_kernel import HALF_DTYPES, GPUKernel
from .tuned import TunedKernel

__all__ = [
    "FlashAttn2Kernel",
    "FlashAttn3Kernel",
    "FlashAttn4Kernel",
    "GPUKernel",
    "SDPACuDNNKernel",
    "SDPAEfficientKernel",
    "SDPAFlashKernel",
    "TunedKernel",
    "all_kernels",
]


class SDPACuDNNKernel(GPUKernel):
    """cuDNN fused attention through ``aten._scaled_dot_product_cudnn_attention``."""

    name = "sdpa_cudnn"
    description = "PyTorch SDPA cuDNN (aten op with LSE); fastest on Hopper"
    aten_ops = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward")
    max_head_dim = 128
    priorities = (((9, 0), 100), ((8, 0), 40))

    strided_inputs = True  # cleared if this cuDNN rejects strided views (then inputs are made contiguous)

    def _retry_contiguous(self, fn: Callable[..., Any], *tensors: torch.Tensor) -> Any:
        """Call ``fn`` on strided views; if cuDNN rejects them, once more on contiguous copies."""
        if self.strided_inputs:
            try:
                return fn(*tensors)
            except RuntimeError:
                if all(t.is_contiguous() for t in tensors):
                    raise
                result = fn(*(t.contiguous() for t in tensors))
                type(self).strided_inputs = False
                return result
        return fn(*(t.contiguous() for t in tensors))

    @staticmethod
    def _tiny(q: torch.Tensor, k: torch.Tensor) -> bool:
        """cuDNN rejects single-row blocks (``s_q = s_kv = 1``): those go to the math kernel."""
        return q.shape[1] == 1 or k.shape[1] == 1

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
        """:meth:`~ring_core.kernels.KernelBackend.forward` through ``aten._scaled_dot_product_cudnn_attention``."""
        b, n, h, _ = q.shape
        if self._tiny(q, k):
            return MathKernel().forward(q, k, v, scale=scale, causal=causal)

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, causal, False, scale=scale
            )

        out, lse, *_ = self._retry_contiguous(run, q, k, v)
        return out.transpose(1, 2), lse.reshape(b, h, n)

    # How the backward op is called; tools/probe_cudnn.py tries each in a subprocess on a GPU.
    backward_variants = ("lse4", "lse4-long1", "contiguous", "flash", "lse3")
    backward_variant = os.environ.get("RING_FLASH_CUDNN_BACKWARD", "lse4")  # lse3 fails: "dim for Stats is invalid"

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
        variant = self.backward_variant
        if self._tiny(q, k):
            grads = MathKernel().backward(dout, q, k, v, out, lse, scale=scale, causal=causal)
            dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
            return dq, dk, dv
        if variant == "flash":  # FlashAttention-2's backward: the same gradients from any out/lse
            return SDPAFlashKernel().backward(dout, q, k, v, out, lse, scale=scale, causal=causal)
        n, m = q.shape[1], k.shape[1]
        seed_t = torch.zeros(1 if variant == "lse4-long1" else (), dtype=torch.int64, device=q.device)
        lse = lse.float().contiguous()
        if variant != "lse3":
            lse = lse.unsqueeze(-1)

        def run(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> Any:
            bhsd = [x.transpose(1, 2) for x in (dout, q, k, v, out)]
            if variant == "contiguous":
                bhsd = [x.contiguous() for x in bhsd]
            return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                *bhsd[:5], lse, seed_t, seed_t, None, None, None, n, m, 0.0, causal, scale=scale
            )

        dq, dk, dv = self._retry_contiguous(run, dout, q, k, v, out)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


class SDPAFlashKernel(GPUKernel):
    """FlashAttention-2 inside PyTorch through ``aten._flash_attention_forward`` ((B, N, H, D) natively).

    Takes sliding windows natively (``window_size_left/right``, bottom-right aligned like ours) and
    packed segments (``cum_seq_q/k``: flash-attn's varlen layout, :meth:`forward_varlen`).
    """

    name = "sdpa_flash"
    description = "PyTorch SDPA flash (FlashAttention-2 in torch; aten op with LSE; GQA, windows, varlen)"
    aten_ops = ("_flash_attention_forward", "_flash_attention_backward")
    supports_gqa = True
    supports_window = True
    supports_varlen = True
    priorities = (((9, 0), 60), ((8, 0), 60))
    padded_lse = False  # set by the first varlen call when this torch pads its lse to (B, H, max_seqlen)

    @staticmethod
    def _window(window: tuple[int, int] | None) -> dict[str, int]:
        return {} if window is None else {"window_size_left": window[0], "window_size_right": window[1]}

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
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`~ring_core.kernels.KernelBackend.forward` through ``aten._flash_attention_forward``."""
        q, k, v = unit_last_stride(q, k, v)
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal, False, scale=scale, **self._window(window)
        )
        return out, lse

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
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dout, q, k, v, out = unit_last_stride(dout, q, k, v, out)
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse.float().contiguous(), None, None, q.shape[1], k.shape[1],
            0.0, causal, empty, empty, scale=scale, **self._window(window),
        )  # fmt: skip
        return dq, dk, dv

    def forward_varlen(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float,
        causal: bool = False,
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(total, H, D)`` rows in segments ``cu_q`` / ``cu_k`` (int32); returns ``out`` and lse ``(H, total)``."""
        q, k, v = unit_last_stride(q, k, v)
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale, **self._window(window)
        )
        if lse.dim() == 3:  # (B, H, max_q): older builds pad each segment's lse
            type(self).padded_lse = True
            lse = _unpad_lse(lse, cu_q)
        return out, lse

    def backward_varlen(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        cu_q: torch.Tensor,
        cu_k: torch.Tensor,
        max_q: int,
        max_k: int,
        *,
        scale: float,
        causal: bool = False,
        window: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``dq, dk, dv`` of :meth:`forward_varlen`'s call from the final ``out`` and lse ``(H, total)``."""
        lse = lse.float().contiguous()
        q, k, v = unit_last_stride(q, k, v)
        if self.padded_lse:
            lse = _pad_lse(lse, cu_q, max_q)
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse, cu_q, cu_k, max_q, max_k, 0.0, causal, empty, empty,
            scale=scale, **self._window(window),
        )  # fmt: skip
        return dq, dk, dv


def _segment_rows(cu: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed row's segment and its row inside the segment."""
    lengths = cu[1:] - cu[:-1]
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths.long())
    return segment, torch.arange(segment.numel(), device=cu.device) - cu[:-1].long()[segment]


def _unpad_lse(lse: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    """``(B, H, max)`` -> ``(H, total)``."""
    segment, row = _segment_rows(cu, lse.shape[-1])
    return lse[segment, :, row].transpose(0, 1)


def _pad_lse(lse: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    """``(H, total)`` -> ``(B, H, max)``."""
    segment, row = _segment_rows(cu, max_len)
    padded = torch.zeros(cu.numel() - 1, lse.shape[0], max_len, dtype=lse.dtype, device=lse.device)
    padded[segment, :, row] = lse.transpose(0, 1)
    return padded


class SDPAEfficientKernel(GPUKernel):
    """Memory-efficient attention (xformers' CUTLASS kernel in torch) through ``aten._efficient_attention_forward``.

    The only GPU backend here that takes masks (as an additive bias) and float32.
    """

    name = "sdpa_efficient"
    description = "PyTorch SDPA memory-efficient (aten op with LSE; masks, float32)"
    aten_ops = ("_efficient_attention_forward", "_efficient_attention_backward")
    dtypes = (torch.float32, *HALF_DTYPES)
    supports_mask = True
    head_dim_multiple = 4
    min_compute_capability = (5, 0)
    priorities = (((8, 0), 30),)
    lse_align = 32  # the op pads the lse's last dim to a multiple of 32

    @staticmethod
    def _bias(
        q: torch.Tensor, k: torch.Tensor, causal: bool, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
        """Additive bias broadcast to ``(b, h, n, m)`` (or ``None``), rows that see no key, mask type."""
        mask_type = 1 if causal else 0  # 1: causal from the top left
        if mask is None:
            return None, None, mask_type
        b, n, h, _ = q.shape
        m = k.shape[1]
        allowed = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        pad = -m % 16  # rows of the bias must be 16-element aligned
        bias = torch.zeros(*allowed.shape[:-1], m + pad, dtype=q.dtype, device=q.device)[..., :m]
        bias.masked_fill_(~allowed, float("-inf"))
        if causal and allowed.shape[-2] == 1:  # row i sees key j <= i: any allowed key up to i
            seen = allowed.to(torch.uint8).cummax(-1).values.bool().transpose(-1, -2)[..., :n, 0]
        else:
            rows = combined_mask(n, m, q.device, causal, allowed) if causal else allowed
            assert rows is not None  # (a mask was given)
            seen = rows.any(-1)
        return bias.expand(b, h, n, m), ~seen.expand(b, h, n), mask_type

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
        """:meth:`~ring_core.kernels.KernelBackend.forward` through ``aten._efficient_attention_forward``."""
        bias, empty, mask_type = self._bias(q, k, causal, mask)
        q, k, v = unit_last_stride(q, k, v)
        out, lse, *_ = torch.ops.aten._efficient_attention_forward(
            q, k, v, bias, None, None, None, None, 0.0, mask_type, True, scale=scale
        )
        lse = lse[:, :, : q.shape[1]]
        if empty is not None:  # rows that see no key: out 0, lse -inf
            lse = lse.masked_fill(empty, float("-inf"))
            out = out.masked_fill(empty.transpose(1, 2).unsqueeze(-1), 0.0)
        return out, lse

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
        bias, _, mask_type = self._bias(q, k, causal, mask)
        b, n, h, _ = q.shape
        padded = torch.zeros(b, h, n + (-n % self.lse_align), dtype=torch.float32, device=q.device)
        padded[:, :, :n] = lse.masked_fill(torch.isinf(lse), 0.0)
        seed_t = torch.zeros((), dtype=torch.int64)
        # the CUTLASS backward assumes packed (B, M, H, K) out/grad_out (strided views give wrong dq, dk)
        dout, q, k, v, out = (x.contiguous() for x in (dout, q, k, v, out))
        dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
            dout, q, k, v, bias, out, None, None, n, k.shape[1], padded, 0.0, seed_t, seed_t,
            mask_type, False, scale=scale,
        )  # fmt: skip
        return dq, dk, dv


def all_kernels() -> list[KernelBackend]:
    """One instance of every backend of this package (available or not)."""
    return [
        SDPACuDNNKernel(),
        SDPAFlashKernel(),
        SDPAEfficientKernel(),
        FlashAttn2Kernel(),
        FlashAttn3Kernel(),
        FlashAttn4Kernel(),
        TunedKernel(),
    ]
