"""A strip call's token rule for flash-attn 4: the tensors its ``mask_mod`` reads, and their torch twin.

flash-attn 4 evaluates a CuTe DSL ``mask_mod`` inside the partial ("mask") tiles of its block lists,
forward and backward, one score at a time: ``mask_mod(batch, head, q_idx, kv_idx, seqlen_info,
aux_tensors)`` with the call's query head and strip row indices. The rule is the one of
:class:`~ring_blocksparse.flex.StripRule`:

    layout[h, qblk[i], kblk[j]]  and  qseg[i] == kseg[j]  and  lo <= kpos[j] - qpos[i] <= hi

(a batch of calls, :class:`~ring_blocksparse.batches.StripBatch`: every row table and the layout read at
the kernel's batch index, call ``b``'s at ``b``)

Every per-call value is in the ``aux_tensors`` (1-D, contiguous, on the device), so one compiled
kernel serves every call, layout, window and step of a shape: flash-attn keys its compile cache by
the ``mask_mod``'s hash and the aux tensors' dtypes and static strides, not their sizes or values.
Two ``mask_mod`` variants compile apart: with the layout read (only where the call's partial tiles
need it, ``Tiles.needs_layout``) and without. The CuTe functions live in ``_fa4_mask`` (imported
only where flash-attn 4 is); :func:`twin` is the same formula over the same tensors in torch, for
the CPU tests.

Aux tensors, in order (int32 unless said): ``qpos, kpos, qseg, kseg, params`` and, with the layout,
``qblk, kblk, layout`` (uint8, the call's layout flattened). ``params`` holds ``lo, hi``, the
layout's head and row strides (head stride 0 for a layout shared by every head), and the batch
strides of the query rows, the key rows and the layout (0 for one call: its batch elements share
its tables; a batch of calls flattens theirs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from .flex import BatchRule, StripRule

# The kernel indexes the flattened layout with int32 arithmetic.
INDEX_LIMIT = 1 << 31
VARIANTS = ("strip_rule", "strip_rule_layout")  # the mask_mods of _fa4_mask, without / with the layout


@dataclass(frozen=True)
class Fa4Rule:
    """One call's rule for flash-attn 4: which ``mask_mod`` variant, and the aux tensors it reads."""

    layout: bool  # the layout is read (the compile-time variant)
    aux: tuple[torch.Tensor, ...]

    @property
    def variant(self) -> str:
        return VARIANTS[self.layout]

    def mask_mod(self) -> Any:
        """The CuTe ``mask_mod`` (imports the CuTe DSL)."""
        return getattr(_cute_module(), self.variant)


def rule_tensors(rule: StripRule | BatchRule, layout: bool) -> Fa4Rule | None:
    """The aux tensors of ``rule`` (on the rule's device), reading the layout when ``layout`` (and the rule has
    one: ``(1 or the call's heads, nb, nb)``, indexed by the call's query head; a batch's: ``(m, ...)``); None when
    the layout cannot be indexed in int32."""

    def rows(*xs: torch.Tensor) -> list[torch.Tensor]:
        return [x.to(torch.int32).reshape(-1).contiguous() for x in xs]

    batched = isinstance(rule, BatchRule)
    lay = rule.layout if layout else None
    strides = [0, 0]
    layout_batch = 0
    if lay is not None:
        h, nq, nk = lay.shape[-3:]
        if lay.numel() >= INDEX_LIMIT:
            return None
        strides = [0 if h == 1 else nq * nk, nk]
        layout_batch = h * nq * nk if batched else 0
    row_batch = [rule.qpos.shape[-1], rule.kpos.shape[-1]] if batched else [0, 0]
    params = torch.tensor(
        [int(rule.lo), int(rule.hi), *strides, *row_batch, layout_batch], dtype=torch.int32, device=rule.qpos.device
    )
    aux = [*rows(rule.qpos, rule.kpos, rule.qseg, rule.kseg), params]
    if lay is not None:
        aux += [*rows(rule.qblk, rule.kblk), lay.to(torch.bool).contiguous().view(torch.uint8).reshape(-1)]
    return Fa4Rule(lay is not None, tuple(aux))


def twin(rule: Fa4Rule) -> Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ``mask_mod``'s formula in torch over the same aux tensors (broadcasting index tensors)."""
    qpos, kpos, qseg, kseg, params = rule.aux[:5]

    def mask_mod(b: Any, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        i, j = q_idx + b * params[4], kv_idx + b * params[5]
        offset = kpos[j] - qpos[i]
        ok = (qseg[i] == kseg[j]) & (offset >= params[0]) & (offset <= params[1])
        if rule.layout:
            qblk, kblk, lay = rule.aux[5:]
            index = b * params[6] + h * params[2] + qblk[i] * params[3] + kblk[j]
            ok = ok & (lay[index].to(torch.int32) > 0)
        return ok

    return mask_mod


@cache
def _cute_module() -> Any:
    from . import _fa4_mask

    return _fa4_mask


def cute_ready() -> bool:
    """Whether the CuTe ``mask_mod``s import (the CuTe DSL and flash-attn 4 are installed)."""
    try:
        _cute_module()
    except Exception:  # not installed, or installed without its CUDA libraries
        return False
    return True
