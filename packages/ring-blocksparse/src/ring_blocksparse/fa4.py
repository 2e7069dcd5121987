"""flash-attn 4's block-sparse kernels for the strips whose tiles need no token rule.

flash-attn 4 (``flash_attn.cute``, when installed) takes block lists like a FlexAttention
``BlockMask``: per tile of 128 query rows, the key tiles to visit, with "full" tiles computed
unmasked. Its partial tiles would need the rule as a CuTe DSL ``mask_mod``, so a strip call runs
on it only when it has no partial tile, or when its only partial tiles are the diagonal tiles of
a causal call of a strip against itself (flash-attn's own causal mask decides there). Other calls
stay on FlexAttention, and so does every call with a key padding mask (its full tiles become
partial where a key is padded) or whose partial tiles a sliding window cuts.

Backward is the engine's rule: the kernel's backward with the final ``out`` and ``lse`` (and the
transposed block lists) gives exactly the call's share of the gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from ring_core.plugin import lse_for_backward

from .strips import block_lists

TILE = 128  # flash-attn 4's sparse block on Hopper: 128 query rows x 128 key rows
HEAD_DIMS = (64, 96, 128)
DISABLE_ENV = "RING_BLOCKSPARSE_FA4"  # "0": never use flash-attn 4 (FlexAttention for every call)


@cache
def _interface() -> Any:
    """``flash_attn.cute.interface`` and its block-sparse tuple type, or None when not installed or broken."""
    try:
        from flash_attn.cute import interface
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except Exception:  # not installed, or installed without its CUDA libraries
        return None
    return interface, BlockSparseTensorsTorch


def available(q: torch.Tensor) -> bool:
    """Whether flash-attn 4's block-sparse kernels can take calls on ``q``'s device, dtype and head dim."""
    if os.environ.get(DISABLE_ENV, "1") == "0" or not q.is_cuda:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in HEAD_DIMS:
        return False
    if torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    return _interface() is not None


@dataclass
class Fa4Blocks:
    """One strip call's block lists, forward (per query tile) and backward (per key tile)."""

    forward: Any
    backward: Any
    causal: bool


def tile_grids(call: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The call's full tiles and its partial tiles that flash-attn's causal mask decides (bool ``(h, nq, nk)``
    each), or None when some tile needs the token rule (then the call stays on FlexAttention)."""
    tiles = call.tiles
    if tiles.tile != TILE or tiles.padded:
        return None
    if not bool(tiles.partial.any()):
        return tiles.full, tiles.partial
    if not (call.causal and call.rule.same_strip) or tiles.needs_layout or tiles.needs_segment or tiles.needs_window:
        return None
    eye = torch.eye(tiles.partial.shape[1], tiles.partial.shape[2], dtype=torch.bool)
    if bool((tiles.partial & ~eye).any()):
        return None
    return tiles.full, tiles.partial


def blocks_for(call: Any, device: torch.device) -> Fa4Blocks | None:
    """flash-attn 4's block lists of a strip call (:func:`tile_grids`), or None."""
    grids = tile_grids(call)
    if grids is None:
        return None
    full, diagonal = grids
    types = _interface()[1]

    def tensors(full: torch.Tensor, partial: torch.Tensor) -> Any:
        full_cnt, full_idx = block_lists(full, device)
        mask_cnt, mask_idx = block_lists(partial, device)
        return types(mask_cnt, mask_idx, full_cnt, full_idx, block_size=(TILE, TILE))

    forward = tensors(full, diagonal)
    backward = tensors(full.transpose(1, 2), diagonal.transpose(1, 2))
    return Fa4Blocks(forward, backward, causal=bool(diagonal.any()))


def fa4_forward(call: Any, blocks: Fa4Blocks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float):
    """``o`` ``(B, n, h, D)`` and ``lse`` ``(B, h, n)`` (float32) of one call on its strided views."""
    interface = _interface()[0]
    qs = call.q_view(q)
    ks, vs = (call.kv_input(call.kv_leaf(x)) for x in (k, v))
    out, lse = interface._flash_attn_fwd(
        qs, ks, vs, softmax_scale=scale, causal=blocks.causal, block_sparse_tensors=blocks.forward, return_lse=True
    )[:2]
    return out, lse


def fa4_backward(call: Any, blocks: Fa4Blocks, q, k, v, out, lse, dout, *, scale: float):
    """``dq`` (the query view's shape), ``dk``, ``dv`` (the key/value leaves' shapes) under the final ``out``
    and ``lse`` ``(B, N, H)``."""
    interface = _interface()[0]
    qs = call.q_view(q)
    ks, vs = (call.kv_input(call.kv_leaf(x)) for x in (k, v))
    final_lse = lse_for_backward(call.q_view(lse).transpose(1, 2))
    dq, dk, dv = interface._flash_attn_bwd(
        qs, ks, vs, call.q_view(out).contiguous(), call.q_view(dout).contiguous(), final_lse,
        softmax_scale=scale, causal=blocks.causal, block_sparse_tensors=blocks.backward,
    )[:3]  # fmt: skip
    if not isinstance(call.kv, slice):  # one key/value head per query head: sum back onto the leaves' heads
        leaf = call.kv_leaf(k)
        dk = dk.new_zeros(leaf.shape).index_add_(2, call.kv, dk)
        dv = dv.new_zeros(call.kv_leaf(v).shape).index_add_(2, call.kv, dv)
    return dq, dk, dv
