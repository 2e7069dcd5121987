"""Whole rows copied (or added) between ``(B, N, H, D)`` tensors by a row index: one Triton pass on CUDA, torch
elsewhere.

torch's ``index_copy_`` / ``index_select`` / ``index_add_`` on dim 1 of a strided 4-d view run an elementwise
index kernel (every element's offset computed from the index); here one program copies a row's ``H x D``
elements (any strides, the last dim contiguous), so the copy runs at memory speed. :func:`add_rows` also
converts the added rows to the target's dtype in the same pass (atomic adds: repeated rows add up; torch's
``index_add_`` under ``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import contextlib
import importlib.util
from functools import cache

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def scatter_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[:, rows] = src``: ``src`` ``(B, R, H, D)``, ``rows`` ``R`` distinct int64 rows of ``dst``."""
    if _triton_ready(dst, src, rows):
        copy_rows_triton(dst, src, rows, scatter=True)
    else:
        dst.index_copy_(1, rows, src)


def gather_rows(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> None:
    """``dst = src[:, rows]``: ``dst`` ``(B, R, H, D)``, ``rows`` ``R`` int64 rows of ``src``."""
    if _triton_ready(dst, src, rows):
        copy_rows_triton(dst, src, rows, scatter=False)
    else:
        dst.copy_(src.index_select(1, rows))


def add_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[:, rows] += src`` (converted to ``dst``'s float32 or float64): ``src`` ``(B, R, H, D)``, ``rows`` ``R``
    int64 rows of ``dst``, repeats allowed (they add up)."""
    if (
        _triton_ready(dst, src, rows, same_dtype=False)
        and dst.dtype in (torch.float32, torch.float64)
        and not torch.are_deterministic_algorithms_enabled()
    ):
        copy_rows_triton(dst, src, rows, scatter=True, add=True)
    else:
        dst.index_add_(1, rows, src.to(dst.dtype))


@cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_ready(dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, same_dtype: bool = True) -> bool:
    return (
        dst.is_cuda
        and src.device == dst.device == rows.device
        and (dst.dtype == src.dtype or not same_dtype)
        and dst.dtype in _DTYPES
        and src.dtype in _DTYPES
        and dst.dim() == src.dim() == 4
        and dst.stride(-1) == src.stride(-1) == 1
        and rows.dtype == torch.int64
        and _triton_installed()
    )


def copy_rows_triton(
    dst: torch.Tensor, src: torch.Tensor, rows: torch.Tensor, *, scatter: bool, add: bool = False
) -> None:
    """The Triton copy (CUDA tensors; CPU ones under ``TRITON_INTERPRET=1``, as the tests run it); ``add``
    (with ``scatter``): atomic adds into ``dst`` instead of stores."""
    from ._triton_rows import copy_rows_kernel

    packed = src if scatter else dst
    b, count, heads, width = packed.shape
    if b * count * heads * width == 0:
        return
    block_d = max(16, 1 << (width - 1).bit_length())
    block_h = min(max(1, 4096 // block_d), 1 << (heads - 1).bit_length())
    rows = rows.contiguous()
    grid = (b * count, -(-heads // block_h))
    with torch.cuda.device(dst.device) if dst.is_cuda else contextlib.nullcontext():
        copy_rows_kernel[grid](
            dst, src, rows, count, heads, width, *dst.stride()[:3], *src.stride()[:3],
            BLOCK_H=block_h, BLOCK_D=block_d, SCATTER=scatter, ADD=add, num_warps=4,
        )  # fmt: skip
