"""flash-attn 4's block-sparse kernels for strip calls, partial tiles included.

flash-attn 4 (``flash_attn.cute``, when installed) takes block lists like a FlexAttention
``BlockMask``: per tile of 128 query rows, the key tiles to visit, "full" tiles computed unmasked
and partial ("mask") tiles where a CuTe DSL ``mask_mod`` decides each score. A strip call runs on it:

- with no ``mask_mod`` when it has no partial tile, or when its only partial tiles are the diagonal
  tiles of a causal call of a strip against itself (flash-attn's own causal mask decides there;
  :func:`tile_grids`);
- otherwise with the strip's exact token rule as the ``mask_mod`` (:mod:`ring_blocksparse.fa4_rule`:
  per-call tensors as ``aux_tensors``, one compiled kernel per variant), on compute capability 9
  (Hopper, where it is tested) unless ``RING_BLOCKSPARSE_FA4_MASK=0`` (for A/B timing: those calls
  then stay on FlexAttention).

Every call with a key padding mask stays on FlexAttention (its full tiles become partial where a key
is padded, per call). ``RING_BLOCKSPARSE_FA4=0`` turns flash-attn 4 off entirely.

If flash-attn 4 rejects a ``mask_mod`` call (it fails to compile, or raises), the call is computed
on FlexAttention instead (forward, or backward recomputing its forward there), a
:class:`Fa4FallbackWarning` says so once, and that ``mask_mod`` variant is not used again in the
process. Running out of GPU memory is no rejection: it propagates.

Backward is the engine's rule: the kernel's backward with the final ``out`` and ``lse`` (and the
transposed block lists) gives exactly the call's share of the gradients. With a ``mask_mod`` both
directions run with ``causal=False`` (the rule holds causality; flash-attn's backward would apply
its causal mask instead of the ``mask_mod``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from ring_core.plugin import lse_for_backward

from .fa4_rule import Fa4Rule, cute_ready, rule_tensors
from .flex import sparse_backward, strip_call_forward
from .flex_backward import call_backward
from .flex_backward import takes as flex_backward_takes
from .strips import block_lists

TILE = 128  # flash-attn 4's sparse block on Hopper: 128 query rows x 128 key rows
HEAD_DIMS = (64, 96, 128)
DISABLE_ENV = "RING_BLOCKSPARSE_FA4"  # "0": never use flash-attn 4 (FlexAttention for every call)
MASK_ENV = "RING_BLOCKSPARSE_FA4_MASK"  # "0": no mask_mod calls (calls that need the rule stay on FlexAttention)
MASK_MAJORS = (9,)  # compute capabilities where calls with a mask_mod run on flash-attn 4
_REJECTED: set[str] = set()  # mask_mod variants flash-attn 4 rejected in this process


class Fa4FallbackWarning(RuntimeWarning):
    """flash-attn 4 rejected a strip call's ``mask_mod``: the call ran on FlexAttention."""


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


def rule_ready(q: torch.Tensor) -> bool:
    """Whether calls that need the token rule may run on flash-attn 4 (with a ``mask_mod``) on ``q``'s device
    (given :func:`available`)."""
    if os.environ.get(MASK_ENV, "1") == "0" or not q.is_cuda:
        return False
    return torch.cuda.get_device_capability(q.device)[0] in MASK_MAJORS and cute_ready()


@dataclass
class Fa4Blocks:
    """One strip call's block lists, forward (per query tile) and backward (per key tile), and the token rule
    of its partial tiles (None: flash-attn's causal mask, or no partial tile)."""

    forward: Any
    backward: Any
    causal: bool
    rule: Fa4Rule | None = None


def tile_grids(call: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The call's full tiles and its partial tiles that flash-attn's causal mask decides (bool ``(h, nq, nk)``
    each), or None when some tile needs the token rule."""
    tiles = call.tiles
    if tiles.tile != TILE or tiles.padded:
        return None
    if not bool(tiles.partial.any()):
        return tiles.full, tiles.partial
    if not (call.causal and call.rule.same_strip) or tiles.needs_layout or tiles.needs_segment or tiles.needs_window:
        return None
    eye = torch.eye(tiles.partial.shape[-2], tiles.partial.shape[-1], dtype=torch.bool)
    if bool((tiles.partial & ~eye).any()):
        return None
    return tiles.full, tiles.partial


def blocks_for(call: Any, device: torch.device, rule: bool = False) -> Fa4Blocks | None:
    """flash-attn 4's block lists of a strip call: without a rule where :func:`tile_grids` allows, else (when
    ``rule``: :func:`rule_ready`) with the call's token rule in its partial tiles; None: FlexAttention."""
    tiles = call.tiles
    grids = tile_grids(call)
    token_rule = None
    if grids is None:
        if not rule or tiles.tile != TILE or tiles.padded:
            return None
        token_rule = rule_tensors(call.rule, tiles.needs_layout)
        if token_rule is None or token_rule.variant in _REJECTED:
            return None
        grids = tiles.full, tiles.partial
    full, partial = grids
    types = _interface()[1]

    def tensors(full: torch.Tensor, partial: torch.Tensor) -> Any:
        full_cnt, full_idx = block_lists(full, device)
        mask_cnt, mask_idx = block_lists(partial, device)
        return types(mask_cnt, mask_idx, full_cnt, full_idx, block_size=(TILE, TILE))

    forward = tensors(full, partial)
    backward = tensors(full.transpose(-2, -1), partial.transpose(-2, -1))
    causal = token_rule is None and bool(partial.any())
    return Fa4Blocks(forward, backward, causal=causal, rule=token_rule)


def _rule_options(blocks: Fa4Blocks) -> dict[str, Any]:
    if blocks.rule is None:
        return {}
    return {"mask_mod": blocks.rule.mask_mod(), "aux_tensors": list(blocks.rule.aux)}


def _rejected(call: Any, blocks: Fa4Blocks, exc: Exception) -> None:
    """Note a rejected ``mask_mod`` call (warn once per variant) and send the call to FlexAttention."""
    assert blocks.rule is not None  # (only mask_mod calls fall back)
    variant = blocks.rule.variant
    if variant not in _REJECTED:
        _REJECTED.add(variant)
        warnings.warn(
            f"flash-attn 4 rejected the strip rule's mask_mod ({variant}): {type(exc).__name__}: {exc}; "
            "such calls run on FlexAttention in this process",
            Fa4FallbackWarning,
            stacklevel=3,
        )
    call.fa4 = False


def _flex_call(call: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, grad: bool) -> Any:
    """The call on FlexAttention (its block mask): ``(o (B, h, n, D), lse (B, h, n), leaves)``."""
    if call.block_mask is None:
        raise RuntimeError("a strip call rejected by flash-attn 4 has no FlexAttention block mask to fall back on")
    return strip_call_forward(call, q, k, v, scale=scale, grad=grad)


def kernel_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as flash-attn 4 reads it in place: a strided view with a unit last stride and no broadcast
    dimension is passed as is (the kernels take strides; flash-attn 4 copies what it cannot align), anything
    else is copied once."""
    return x if x.stride(-1) == 1 and 0 not in x.stride() else x.contiguous()


def fa4_forward(call: Any, blocks: Fa4Blocks, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float):
    """``o`` ``(B, n, h, D)`` and ``lse`` ``(B, h, n)`` (float32) of one call on its strided views."""
    if blocks.rule is None or blocks.rule.variant not in _REJECTED:
        interface = _interface()[0]
        qs = call.q_view(q)
        ks, vs = (call.kv_input(call.kv_leaf(x)) for x in (k, v))
        try:
            out, lse = interface._flash_attn_fwd(
                qs, ks, vs, softmax_scale=scale, causal=blocks.causal, block_sparse_tensors=blocks.forward,
                return_lse=True, **_rule_options(blocks),
            )[:2]  # fmt: skip
            return out, lse
        except Exception as exc:
            if blocks.rule is None or isinstance(exc, torch.OutOfMemoryError):
                raise
            _rejected(call, blocks, exc)
    o, lse, _ = _flex_call(call, q, k, v, scale=scale, grad=False)
    return o.transpose(1, 2), lse


def fa4_backward(call: Any, blocks: Fa4Blocks, q, k, v, out, lse, dout, *, scale: float, outputs=None):
    """``dq`` (the query view's shape), ``dk``, ``dv`` (the key/value leaves' shapes) under the final ``out``
    and ``lse`` ``(B, N, H)``. ``outputs``: views of the leaves' shape and ``q``'s dtype (a call with a slice
    of key/value heads) that flash-attn 4 writes ``dk`` and ``dv`` into; they are returned then (and are
    written, by a copy, also when the call falls back to FlexAttention)."""
    if blocks.rule is not None and blocks.rule.variant in _REJECTED:
        return _written(_flex_backward(call, q, k, v, out, lse, dout, scale=scale), outputs)
    interface = _interface()[0]
    qs = call.q_view(q)
    ks, vs = (call.kv_input(call.kv_leaf(x)) for x in (k, v))
    final_lse = lse_for_backward(call.q_view(lse).transpose(1, 2))
    written = {} if outputs is None else {"dk": outputs[0], "dv": outputs[1]}
    try:
        dq, dk, dv = interface._flash_attn_bwd(
            qs, ks, vs, kernel_view(call.q_view(out)), kernel_view(call.q_view(dout)), final_lse,
            softmax_scale=scale, causal=blocks.causal, block_sparse_tensors=blocks.backward, **_rule_options(blocks),
            **written,
        )[:3]  # fmt: skip
    except Exception as exc:
        if blocks.rule is None or isinstance(exc, torch.OutOfMemoryError):
            raise
        _rejected(call, blocks, exc)
        return _written(_flex_backward(call, q, k, v, out, lse, dout, scale=scale), outputs)
    if outputs is not None:
        return dq, *outputs
    if not isinstance(call.kv, slice):  # one key/value head per query head: sum back onto the leaves' heads
        leaf = call.kv_leaf(k)
        dk = dk.new_zeros(leaf.shape).index_add_(2, call.kv, dk)
        dv = dv.new_zeros(call.kv_leaf(v).shape).index_add_(2, call.kv, dv)
    return dq, dk, dv


def _written(grads: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, torch.Tensor] | None):
    """``(dq, dk, dv)``, with ``dk`` and ``dv`` copied into ``outputs`` (and those returned) when given."""
    if outputs is None:
        return grads
    outputs[0].copy_(grads[1])
    outputs[1].copy_(grads[2])
    return grads[0], *outputs


def _flex_backward(call: Any, q, k, v, out, lse, dout, *, scale: float):
    """A rejected call's gradients on FlexAttention under the final ``out``/``lse``: its backward operator alone
    where it runs (:mod:`ring_blocksparse.flex_backward`), else its forward recomputed and differentiated."""
    if call.block_mask is not None and flex_backward_takes(call, q):
        return call_backward(call, q, k, v, out, lse, dout, scale=scale)
    o, lse_call, leaves = _flex_call(call, q, k, v, scale=scale, grad=True)
    return sparse_backward(call, o, lse_call, leaves, dout, out, lse)
