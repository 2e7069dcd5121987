"""Writing a block's output or gradient into a strided view of the full tensor, in one pass.

The fused dilated path (:mod:`ring_flash.fused`) puts every kernel call's result
into strided views (every ``r``-th position, every ``r``-th head). With torch ops a
weighted merge ``view += o * exp(lse_block - lse)`` takes several passes (the
weights, a float32 product, a mixed-dtype add on a broadcast); on CUDA with Triton
it is one kernel per block that reads the block, the two log-sum-exps and the view,
computes in float32 and writes the view. Without Triton (or on the CPU, or in
float64) the same arithmetic runs as torch ops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_DIMS = 4  # leading (row) dims a view may have; the last dim is contiguous


def triton_enabled() -> bool:
    """Whether CUDA merges use the Triton kernel (``RING_FLASH_TRITON=0`` turns it off)."""
    return os.environ.get("RING_FLASH_TRITON", "1") != "0" and importlib.util.find_spec("triton") is not None


def merge_block(
    dst: torch.Tensor,
    src: torch.Tensor,
    *,
    accumulate: bool,
    src_lse: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> None:
    """``dst (+)= src * w`` in place, with ``w = exp(src_lse - lse)`` (0 where ``lse`` is ``-inf``) or 1.

    ``dst`` and ``src`` have the same shape ``(..., D)`` (any strides; ``dst`` may be
    ``src`` itself); ``src_lse`` and ``lse`` have shape ``dst.shape[:-1]``.
    """
    weighted = lse is not None
    if _use_triton(dst, src, src_lse, lse):
        _merge_triton(dst, src, accumulate, src_lse, lse)
        return
    if not weighted:
        dst.add_(src) if accumulate else dst.copy_(src)
        return
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    weight = torch.exp(src_lse.to(lse.dtype) - safe).unsqueeze(-1)
    dst.addcmul_(src, weight) if accumulate else dst.copy_(src * weight)


def _use_triton(dst, src, src_lse, lse) -> bool:
    tensors = [t for t in (src_lse, lse) if t is not None]
    return (
        dst.is_cuda
        and dst.dim() - 1 <= _MAX_DIMS
        and dst.dtype in _TRITON_DTYPES
        and src.dtype in _TRITON_DTYPES
        and dst.stride(-1) == 1
        and src.stride(-1) == 1
        and all(t.dtype == torch.float32 for t in tensors)
        and triton_enabled()
    )


def _row_strides(x: torch.Tensor) -> list[int]:
    """Strides of the leading dims, padded in front to :data:`_MAX_DIMS`."""
    strides = list(x.stride()[: len(x.shape) - 1]) if x.dim() > 1 else []
    return [0] * (_MAX_DIMS - len(strides)) + strides


def _merge_triton(dst, src, accumulate, src_lse, lse) -> None:
    from ._triton_merge import merge_kernel

    shape = list(dst.shape[:-1])
    sizes = [1] * (_MAX_DIMS - len(shape)) + shape
    rows, width = dst.numel() // max(1, dst.shape[-1]), dst.shape[-1]
    if rows == 0 or width == 0:
        return
    weighted = lse is not None
    src_lse_strides = [0] * (_MAX_DIMS - src_lse.dim()) + list(src_lse.stride()) if weighted else [0] * _MAX_DIMS
    lse_strides = [0] * (_MAX_DIMS - lse.dim()) + list(lse.stride()) if weighted else [0] * _MAX_DIMS
    block_d = max(16, 1 << (width - 1).bit_length())
    block_r = max(1, 4096 // block_d)
    grid = ((rows + block_r - 1) // block_r,)
    with torch.cuda.device(dst.device) if dst.is_cuda else contextlib.nullcontext():  # CPU: TRITON_INTERPRET=1
        merge_kernel[grid](
            dst, src, src_lse if weighted else dst, lse if weighted else dst, rows, *sizes[1:],
            *_row_strides(dst), *_row_strides(src), *src_lse_strides, *lse_strides, width,
            BLOCK_R=block_r, BLOCK_D=block_d, ACCUMULATE=accumulate, WEIGHTED=weighted, num_warps=4,
        )  # fmt: skip
