"""A call's checks before any work or communication, and the gather plan they admit.

On this rank: the configuration, ``q, k, v`` and the block layout. Across ranks (:func:`_agree`): one small
all-gather first, so every rank raises the same error or none; the block layout takes part by its
fingerprint (:func:`layout_digest`). Plans are cached by the layout tensor's identity and version
(:func:`layout_identity`): editing the layout in place misses the cache, and what was built for the old
version is dropped.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch

from ring_core.plugin import (
    RingComm,
    RingCommStats,
    branches,
    check_dilated_config,
    check_divisible,
    check_layout,
    check_qkv,
    group_rank_and_size,
    tensor_version,
    validate_inputs,
)

from .patterns import check_block_layout, check_block_size
from .plan import Plan, build_plan

_V = TypeVar("_V")


def _prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    block_size: int,
    block_layout: torch.Tensor | None,
    merge: str,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    layout: str,
    process_group: Any,
    transposed_backward: bool = True,
    cache: dict[tuple[Any, ...], Plan] | None = None,
    build: bool = True,
    timeout: float | None = None,
    context: str = "",
    window: tuple[int, int] = (-1, -1),
    documents: tuple[int, ...] | None = None,
) -> tuple[Plan | None, dict[str, Any]]:
    """Validate this rank's inputs and build or reuse the plan (if ``build``); across ranks :func:`_agree` ran
    first. Returns the plan and the schedule's communication arguments. ``window`` and ``documents``
    (checked ``cu_seqlens`` values) restrict the tile pairs; a plan of documents is not kept (a new
    batch of documents every call)."""
    segments, rates = check_dilated_config(segment_lengths, dilation_rates, merge)
    check_block_size(block_size)
    check_layout(layout)
    check_qkv(q, k, v, key_padding_mask)
    rank, world = group_rank_and_size(process_group)
    seq_len = q.shape[1] * world
    check_divisible(seq_len, world, layout)
    if block_layout is not None:
        check_block_layout(block_layout, seq_len, block_size, q.shape[2])
    key = (
        layout_identity(block_layout), seq_len, q.shape[2], k.shape[2], bool(is_causal), rank, world, layout,
        str(q.device), transposed_backward, segments, rates, merge, block_size, window,
    )  # fmt: skip
    if documents is not None:
        cache = None
    plan = None if cache is None else cache.get(key)
    if plan is None and build:
        plan = build_plan(
            seq_len=seq_len,
            num_heads=q.shape[2],
            num_kv_heads=k.shape[2],
            branch_list=branches(segments, rates, merge, q.shape[2]),
            block_size=block_size,
            block_layout=block_layout,
            causal=bool(is_causal),
            rank=rank,
            world_size=world,
            layout=layout,
            transposed_backward=transposed_backward,
            window=window,
            documents=documents,
        ).to(q.device)
        if cache is not None:
            _remember(cache, key, plan)
    return plan, {"group": process_group if world > 1 else None, "timeout": timeout, "context": context}


def layout_identity(block_layout: torch.Tensor | None) -> tuple[int, Hashable] | None:
    """A layout tensor by identity and version: an in-place edit changes the version, so cached plans miss. An
    inference tensor counts no versions: its contents stand in (read on every call)."""
    if block_layout is None:
        return None
    version = tensor_version(block_layout)
    if version is None:
        return id(block_layout), (tuple(block_layout.shape), block_layout.cpu().numpy().tobytes())
    return id(block_layout), version


def _remember(cache: dict[tuple[Any, ...], _V], key: tuple[Any, ...], value: _V) -> None:
    """``cache[key] = value`` (``key[0]``: :func:`layout_identity`); what was built for an earlier version of the
    same layout tensor is stale, and dropped."""
    if key[0] is not None:
        for old in [old for old in cache if old[0] is not None and old[0][0] == key[0][0]]:
            del cache[old]
    cache[key] = value


def layout_digest(block_layout: torch.Tensor | None) -> int:
    """A fingerprint of a block layout (its shape and which blocks are allowed), equal on every rank for equal
    layouts; 0 for ``None``."""
    if block_layout is None:
        return 0
    allowed = block_layout.flatten().nonzero().flatten()
    mixed = (allowed * 0x9E3779B1 + 0x7F4A7C15) * (allowed ^ 0x5BD1E995)  # int64, wraps
    return zlib.crc32(repr((tuple(block_layout.shape), int(mixed.sum()), allowed.numel())).encode())


def _agree(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    block_size: int,
    layout_of: Callable[[int, int], torch.Tensor | None],
    merge: str,
    is_causal: bool,
    key_padding_mask: torch.Tensor | None,
    layout: str,
    process_group: Any,
    softmax_scale: float | None,
    dropout_p: float,
    transposed_backward: bool,
    timeout: float | None,
    name: str,
    window: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
    digest: Callable[[torch.Tensor | None], int] = layout_digest,
    return_lse: bool = False,
) -> tuple[int, ...] | None:
    """Across ranks: check everything on this rank, then agree (one small all-gather, before any other
    communication): the same error on every rank, or none. ``layout_of(seq_len, num_heads)`` gives the block
    layout (or ``None``); ``digest`` fingerprints it; ``window``, ``cu_seqlens`` (global ``N``) and
    ``return_lse`` (its gradient is one more pass of the ring's backward) are agreed on too. On one process
    there is no collective: the configuration, ``q, k, v`` and ``cu_seqlens`` are checked here, the block
    layout where the plan is built. Returns ``cu_seqlens``' checked values (None without), for
    :func:`~ring_core.ops.run_attention`'s ``documents``: the ops then need not read the tensor again."""
    rank, world = group_rank_and_size(process_group)
    segments, rates = check_dilated_config(segment_lengths, dilation_rates, merge)
    check_block_size(block_size)
    check_layout(layout)

    def local_check() -> tuple[int]:
        seq_len = q.shape[1] * world
        block_layout = layout_of(seq_len, q.shape[2])
        if block_layout is not None:
            check_block_layout(block_layout, seq_len, block_size, q.shape[2])
        return (digest(block_layout),)

    return validate_inputs(
        q, k, v, key_padding_mask, world_size=world,
        comms=lambda: [RingComm(process_group, rank, world, RingCommStats(), timeout=timeout)], cu_seqlens=cu_seqlens,
        causal=bool(is_causal), layout=layout, merge=merge,
        config=(segments, rates, block_size, dropout_p, bool(transposed_backward), bool(return_lse)),
        scale=softmax_scale, name=name,
        local_check=local_check, window_size=window,
    )  # fmt: skip
