"""Writing a block's output or gradient into a strided view of the full tensor, in one pass.

The fused dilated path (:mod:`ring_flash.fused`) and the engine put every kernel
call's result into strided views (every ``r``-th position, every ``r``-th head).
With torch ops an LSE merge ``view = view * w_a + o * w_b`` (and ``lse``) takes
several passes (the weights, float32 products, a mixed-dtype add on a broadcast);
on CUDA with Triton it is one kernel per block that reads the view, the block and
the two log-sum-exps, computes in float32 and writes the view and ``lse``
(:func:`online_merge`); gradient adds likewise (:func:`merge_block`, a call's
``dq, dk, dv`` in one launch with :func:`merge_blocks`). Without Triton (or on the
CPU, or in float64) the same arithmetic runs as torch ops.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Sequence
from functools import cache

import torch

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_DIMS = 4  # leading (row) dims a view may have; the last dim is contiguous


@cache
def installed(package: str) -> bool:
    """Whether ``package`` can be imported (looked up once: kernel selection and merges ask on every call)."""
    return importlib.util.find_spec(package) is not None


def triton_enabled() -> bool:
    """Whether CUDA merges use the Triton kernel (``RING_FLASH_TRITON=0`` turns it off)."""
    return os.environ.get("RING_FLASH_TRITON", "1") != "0" and installed("triton")


def merge_block(dst: torch.Tensor, src: torch.Tensor, *, accumulate: bool, index: torch.Tensor | None = None) -> None:
    """``dst (+)= src`` in place; ``dst`` and ``src`` have the same shape ``(..., D)`` (any strides, any float
    dtypes: the add is computed in float32).

    ``index`` (distinct int64 rows of ``dst``): ``dst[index] (+)= src`` instead, ``dst`` and ``src`` of shape
    ``(rows, h, D)`` (packed rows gathered from ``dst``'s), without a gathered copy of ``dst``."""
    if _use_triton([dst], [src], index):
        _merge_triton([dst], [src], accumulate, index)
        return
    if index is None:
        dst.add_(src) if accumulate else dst.copy_(src)
    else:
        dst.index_add_(0, index, src.to(dst.dtype)) if accumulate else dst.index_copy_(0, index, src.to(dst.dtype))


def merge_blocks(
    dsts: Sequence[torch.Tensor],
    srcs: Sequence[torch.Tensor],
    *,
    accumulate: bool,
    index: torch.Tensor | None = None,
) -> None:
    """:func:`merge_block` for several pairs (``dq, dk, dv``; the same ``index``), one launch where they are alike."""
    alike = (
        len(dsts) <= 3
        and len({(d.shape, d.stride(), d.dtype) for d in dsts}) == 1
        and len({(s.shape, s.stride(), s.dtype) for s in srcs}) == 1
        and all(_shift(x, xs[0]) is not None for xs in (dsts, srcs) for x in xs)
    )
    if alike and _use_triton(dsts, srcs, index):
        _merge_triton(dsts, srcs, accumulate, index)
        return
    for dst, src in zip(dsts, srcs):
        merge_block(dst, src, accumulate=accumulate, index=index)


def gather_rows(srcs: Sequence[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """``src[index]`` of each ``(N, h, D)`` view (any strides; int64 ``index``) as a new contiguous tensor, one pass
    (alike views, e.g. ``q, k, v``, in one launch); torch's ``index_select`` on strided views is an elementwise
    gather several times slower."""
    dsts = [torch.empty((index.numel(), *src.shape[1:]), dtype=src.dtype, device=src.device) for src in srcs]
    alike = (
        len(srcs) <= 3
        and len({(s.shape, s.stride(), s.dtype) for s in srcs}) == 1
        and all(_shift(x, xs[0]) is not None for xs in (dsts, srcs) for x in xs)
    )
    if alike and _use_triton(dsts, srcs) and _indexable(srcs[0], dsts[0], index):
        _merge_triton(dsts, srcs, False, index, gather=True)
        return dsts
    for dst, src in zip(dsts, srcs):
        torch.index_select(src, 0, index, out=dst)
    return dsts


def _shift(x: torch.Tensor, first: torch.Tensor) -> int | None:
    """Elements from ``first``'s start to ``x``'s (``None`` unless a whole number of elements)."""
    delta = x.data_ptr() - first.data_ptr()
    return None if delta % x.element_size() else delta // x.element_size()


def _use_triton(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], index: torch.Tensor | None = None) -> bool:
    return (
        all(x.is_cuda and x.dtype in _TRITON_DTYPES and x.stride(-1) == 1 for x in (*dsts, *srcs))
        and dsts[0].dim() - 1 <= _MAX_DIMS
        and (index is None or _indexable(dsts[0], srcs[0], index))
        and triton_enabled()
    )


def _indexable(full: torch.Tensor, packed: torch.Tensor, index: torch.Tensor) -> bool:
    """Whether the kernels' row index (leading dim 2 of 4: the rows of ``(rows, h, D)``) serves ``full[index]``
    against ``packed``."""
    return (
        full.dim() == packed.dim() == 3
        and full.shape[1:] == packed.shape[1:]
        and index.dim() == 1
        and index.numel() == packed.shape[0]
        and index.dtype == torch.int64
        and index.device == full.device
        and index.is_contiguous()
    )


def _padded(values: Sequence[int]) -> list[int]:
    """Sizes or strides of the leading dims, padded in front to :data:`_MAX_DIMS`."""
    return [0] * (_MAX_DIMS - len(values)) + list(values)


def _geometry(x: torch.Tensor) -> tuple[int, int, list[int], int, int]:
    """Rows and row width of ``x``, the sizes of its leading dims padded to :data:`_MAX_DIMS`, and the
    tile (rows, columns) of one program: about 4096 elements."""
    width = x.shape[-1]
    block_d = max(16, 1 << (width - 1).bit_length())
    sizes = [1] * (_MAX_DIMS - x.dim() + 1) + list(x.shape[:-1])
    return x.numel() // max(1, width), width, sizes, max(1, 4096 // block_d), block_d


def _merge_triton(
    dsts: Sequence[torch.Tensor],
    srcs: Sequence[torch.Tensor],
    accumulate: bool,
    index: torch.Tensor | None = None,
    gather: bool = False,
) -> None:
    """The merge kernel over ``srcs``' rows (``gather``: over ``dsts``', read from ``srcs[index]``)."""
    from ._triton_merge import merge_kernel

    dst, src = dsts[0], srcs[0]
    rows, width, sizes, block_r, block_d = _geometry(dst if gather else src)
    if rows == 0 or width == 0:
        return
    shifts = [_shift(x, xs[0]) for xs in (dsts, srcs) for x in xs[1:]]
    shifts = shifts[: len(dsts) - 1] + [0] * (3 - len(dsts)) + shifts[len(dsts) - 1 :] + [0] * (3 - len(dsts))
    grid = ((rows + block_r - 1) // block_r, len(dsts))
    with torch.cuda.device(dst.device) if dst.is_cuda else contextlib.nullcontext():  # CPU: TRITON_INTERPRET=1
        merge_kernel[grid](
            dst, src, dst if index is None else index, rows, *sizes[1:], *_padded(dst.stride()[:-1]),
            *_padded(src.stride()[:-1]), width, *shifts,
            BLOCK_R=block_r, BLOCK_D=block_d, ACCUMULATE=accumulate, DST_INDEXED=index is not None and not gather,
            SRC_INDEXED=gather, num_warps=4,
        )  # fmt: skip


def online_merge(
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    out_block: torch.Tensor,
    lse_block: torch.Tensor,
    index: torch.Tensor | None = None,
) -> bool:
    """:func:`ring_core.merge_into` in one Triton pass on CUDA (``out_acc`` float32, bfloat16 or float16, computed in
    float32; log-sum-exps float32); ``False`` if it cannot. ``index``: the block's rows are the accumulator's rows
    ``index`` (as in :func:`merge_block`)."""
    usable = (
        lse_acc.dtype == lse_block.dtype == torch.float32
        and out_acc.dim() - 1 <= _MAX_DIMS
        and lse_block.shape == out_block.shape[:-1]
        and lse_acc.shape == out_acc.shape[:-1]
        and (index is not None or lse_acc.shape == lse_block.shape)
        and _use_triton([out_acc], [out_block], index)
    )
    if not usable:
        return False
    from ._triton_merge import online_merge_kernel

    rows, width, sizes, block_r, block_d = _geometry(out_block)
    if rows == 0 or width == 0:
        return True
    with torch.cuda.device(out_acc.device) if out_acc.is_cuda else contextlib.nullcontext():  # CPU: TRITON_INTERPRET=1
        online_merge_kernel[((rows + block_r - 1) // block_r,)](
            out_acc, lse_acc, out_block, lse_block, out_acc if index is None else index, rows, *sizes[1:],
            *_padded(out_acc.stride()[:-1]), *_padded(lse_acc.stride()), *_padded(out_block.stride()[:-1]),
            *_padded(lse_block.stride()), width, BLOCK_R=block_r, BLOCK_D=block_d, INDEXED=index is not None,
            num_warps=4,
        )  # fmt: skip
    return True
