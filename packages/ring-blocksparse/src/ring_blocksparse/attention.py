"""Block-sparse dilated attention, on one device or as a sparse ring over a process group.

A key is allowed iff the dilated branches allow it (counted as in SPEC.md) **and** the
block layout does; the softmax runs over the allowed keys through LSE merges. Two ways
compute it: strips (:mod:`ring_blocksparse.strided`: one fused kernel per branch offset on
strided views, per ring step too) and the gather path (:mod:`ring_blocksparse.gather`: tiles
gathered into dense blocks; everything, on any device). Empty (query tile, key tile) pairs
are never computed, and across ranks a rank sends exactly the key/value rows some query
tile of the receiver needs (nothing at all when no tile needs them).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ring_core.plugin import (
    AttentionOp,
    BlockKernel,
    CallOp,
    KernelRequest,
    OpCall,
    RingComm,
    RingCommStats,
    block_kernel,
    blockwise_attention,
    branches,
    check_cu_seqlens,
    check_dilated_config,
    check_divisible,
    check_dropout,
    check_layout,
    check_qkv,
    check_window,
    default_scale,
    documents_key,
    dropout_seed,
    group_rank_and_size,
    run_attention,
    validate_ring_inputs,
)

from .flex import check_kernel_options, flex_reasons
from .gather import BlockSparseSchedule, CommStats
from .patterns import Pattern, build_pattern, check_block_layout, check_block_size
from .plan import Plan, build_plan
from .strided import SPARSE_KERNELS, StripPlan, StripRingSchedule, StripRun, build_strip_plan, strip_attention

METHODS = ("auto", "gather", "flex")


class _GatherOp(AttentionOp):
    """The custom ops' side of the gather path of a :class:`BlockSparseRingDilatedAttention`."""

    def forward(self, q, k, v, call: OpCall):
        self.owner.comm_stats = CommStats()  # this call's bytes (its backward adds to them)
        return super().forward(q, k, v, call)

    def schedule(self, q, k, v, call: OpCall) -> BlockSparseSchedule:
        return self.owner._gather_schedule(q, k, v, call)


def _kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool,
    padded: bool,
    dropout_p: float,
    scale: float,
    kernel: str | None,
    seed: int | None = None,
) -> tuple[BlockKernel, BlockKernel]:
    """The kernel for unmasked tiles (and causal diagonal tiles) and the one for masked tiles (one dropout seed)."""
    if seed is None:
        seed = dropout_seed() if dropout_p > 0 else 0  # one seed: both kernels' blocks are one call's
    full, masked = (
        block_kernel(
            q, k, causal=causal, has_mask=has_mask, dropout_p=dropout_p, softmax_scale=scale, kernel=kernel, seed=seed
        )
        for has_mask in (padded, True)
    )
    return full, masked


def block_sparse_dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    block_size: int,
    block_layout: torch.Tensor | None = None,
    merge: str = "lse",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    kernel: str | None = None,
    layout: str = "contiguous",
    process_group: Any = None,
    stats: CommStats | None = None,
    transposed_backward: bool = True,
    return_lse: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention restricted to a block layout (SPEC.md), ``(B, N, H, D)`` shards in and out.

    Under a process group of ``P`` ranks each rank passes its shard (``layout``
    ``"contiguous"`` or ``"zigzag"``) and the layout is over the global ``N = n * P``.
    ``block_layout=None`` allows every block (plain dilated attention). ``stats``
    collects the bytes sent and received. ``transposed_backward`` batches the backward by
    key tile (whole dK/dV per call; the default) instead of by query tile. With
    ``return_lse`` also returns the log-sum-exp ``(B, H, n)``. ``window_size`` and
    ``cu_seqlens`` (global document boundaries, ``B = 1``) as in
    :func:`ring_core.dilated_attention`; the layout indexes global positions.
    """
    window = check_window(window_size)
    _agree(
        q, k, v, key_padding_mask, segment_lengths=segment_lengths, dilation_rates=dilation_rates, merge=merge,
        block_size=block_size, is_causal=is_causal, layout=layout, process_group=process_group,
        transposed_backward=transposed_backward, window=window, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    dropout_p = check_dropout(dropout_p)
    scale = default_scale(q.shape[-1], softmax_scale)

    plans: dict = {}  # this call's plan, built once for its forward and backward

    def make(q, k, v, call: OpCall) -> BlockSparseSchedule:
        if call.documents not in plans:
            plans[call.documents] = _prepare(
                q, k, v, segment_lengths=segment_lengths, dilation_rates=dilation_rates, block_size=block_size,
                block_layout=block_layout, merge=merge, is_causal=is_causal, key_padding_mask=key_padding_mask,
                layout=layout, process_group=process_group, transposed_backward=transposed_backward, window=window,
                documents=call.documents,
            )  # fmt: skip
        plan, schedule_args = plans[call.documents]
        mask = call.key_padding_mask
        full, masked = _kernels(
            q, k, causal=call.causal, padded=mask is not None, dropout_p=call.dropout_p, scale=scale, kernel=kernel,
            seed=call.seed,
        )  # fmt: skip
        return BlockSparseSchedule(plan, full, masked, key_padding_mask=mask, stats=stats, **schedule_args)

    out, lse = run_attention(
        CallOp(make), q, k, v, key_padding_mask=key_padding_mask, causal=bool(is_causal), dropout_p=dropout_p,
        lse_grad=return_lse, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    return (out, lse.transpose(1, 2)) if return_lse else out


def _agree(
    q,
    k,
    v,
    key_padding_mask,
    *,
    segment_lengths,
    dilation_rates,
    merge,
    block_size,
    is_causal,
    layout,
    process_group,
    transposed_backward,
    window,
    cu_seqlens,
    validated: set | None = None,
) -> tuple[int, ...] | None:
    """Check ``cu_seqlens`` (global ``N``) and, under a process group, make the ranks agree on the call (inputs,
    configuration, ``window_size`` and ``cu_seqlens``: every rank raises the same error) unless a call with the
    same signature was agreed on before (``validated``). Returns the checked ``cu_seqlens`` values."""
    if group_rank_and_size(process_group)[1] == 1:
        check_qkv(q, k, v, key_padding_mask)
        return None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    config = (tuple(segment_lengths), tuple(dilation_rates), block_size, transposed_backward, window)
    key = (
        *((tuple(t.shape), t.dtype, t.device) for t in (q, k, v)),
        None if key_padding_mask is None else tuple(key_padding_mask.shape),
        bool(is_causal), layout, config, documents_key(cu_seqlens),
    )  # fmt: skip
    if validated is not None and key in validated:
        return key[-1]
    documents = validate_ring_inputs(
        q, k, v, key_padding_mask, causal=bool(is_causal), layout=layout, merge=merge, config=config, scale=None,
        comm=RingComm.for_group(process_group, RingCommStats()), name="BlockSparseRingDilatedAttention",
        window_size=window, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    if validated is not None:
        validated.add(key)
    return documents


def _prepare(
    q,
    k,
    v,
    *,
    segment_lengths,
    dilation_rates,
    block_size,
    block_layout,
    merge,
    is_causal,
    key_padding_mask,
    layout,
    process_group,
    transposed_backward: bool = True,
    cache: dict | None = None,
    build: bool = True,
    window: tuple[int, int] = (-1, -1),
    documents: tuple[int, ...] | None = None,
) -> tuple[Plan | None, dict]:
    """Validate everything (before any communication) and build or reuse the plan (if ``build``).

    ``window`` and ``documents`` (checked ``cu_seqlens`` values) restrict the tile pairs; a plan
    of documents is not kept (a new batch of documents every call)."""
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
        seq_len, q.shape[2], k.shape[2], bool(is_causal), rank, world, layout, str(q.device), transposed_backward,
        window,
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
            cache[key] = plan
    return plan, {"group": process_group if world > 1 else None}


class BlockSparseRingDilatedAttention(nn.Module):
    """Exact block-sparse + dilated attention, on one device or as a sparse ring.

    Forward: ``attn(q, k, v, *, is_causal=False, key_padding_mask=None, return_lse=False)`` on this rank's
    ``(B, n, H, D)`` shard. Beyond the arguments of :class:`ring_core.RingDilatedAttention`:

    - ``block_size``: tokens per block of the layout.
    - ``pattern``: the name of a registered pattern (built with ``**pattern_options``) or a
      :class:`~ring_blocksparse.Pattern`; with no ``pattern`` and no ``block_layout``, every
      block (plain dilated attention).
    - ``block_layout``: an explicit bool ``(H or 1, ceil(N/b), ceil(N/b))`` over the global
      sequence, instead of a ``pattern``.
    - ``transposed_backward``: batch the gather path's backward by key tile.
    - ``method``: ``"flex"`` (strips: one FlexAttention kernel per dilated branch offset on
      strided views, dense strips on the registry's kernel, LSE-merged; on one process and per
      ring step; needs every rate to divide ``block_size``, runs of the sequence that split into
      whole kernel tiles, no padding or dropout, and a backward only on CUDA; raises otherwise),
      ``"gather"`` (tiles gathered into dense blocks, the blockwise engine; everything) or
      ``"auto"`` (flex on CUDA when it applies, else gather; gather under ``torch.compile`` and
      with ``return_lse``).
    - ``flex_kernel_options``: FlexAttention ``kernel_options`` (e.g. ``{"fwd_num_stages": 2}``)
      over the safe flags and tuned tiles the strip path picks itself
      (:func:`ring_blocksparse.flex.kernel_options_for`).
    - ``**pattern_options``: the arguments of the named ``pattern`` (e.g. ``window``, ``seed``).

    ``sparse_kernel`` (attribute): ``"flex"``, or ``"math"`` for the strip path's dense twin
    (tests: a CPU backward). After each call, ``comm_stats`` holds the bytes this rank sent and
    received, ``last_method`` the method and ``last_plan`` the plan.
    """

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        block_size: int = 64,
        pattern: str | Pattern | None = None,
        block_layout: torch.Tensor | None = None,
        layout: str = "contiguous",
        process_group: Any = None,
        merge: str = "lse",
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        kernel: str | None = None,
        transposed_backward: bool = True,
        method: str = "auto",
        flex_kernel_options: dict[str, Any] | None = None,
        window_size: tuple[int, int] = (-1, -1),
        **pattern_options: Any,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = check_dilated_config(segment_lengths, dilation_rates, merge)
        self.window_size = check_window(window_size)
        self.block_size = check_block_size(block_size)
        self.layout = check_layout(layout)
        if pattern is not None and block_layout is not None:
            raise ValueError("give either pattern or block_layout, not both")
        if pattern_options and pattern is None:
            raise ValueError(f"pattern options {sorted(pattern_options)} were given without a pattern")
        if isinstance(pattern, str):
            pattern = build_pattern(pattern, **pattern_options)
        elif pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a registered pattern name or a Pattern, got {pattern!r}")
        elif pattern_options:
            raise ValueError(f"pattern options {sorted(pattern_options)} only apply to a pattern given by name")
        if block_layout is not None and (
            not isinstance(block_layout, torch.Tensor) or block_layout.dtype != torch.bool or block_layout.dim() != 3
        ):
            raise TypeError(f"block_layout must be a bool tensor (H or 1, ceil(N/b), ceil(N/b)), got {block_layout!r}")
        self.pattern = pattern
        self.block_layout = block_layout
        self.process_group = process_group
        self.merge = merge
        self.softmax_scale = softmax_scale
        self.dropout = check_dropout(dropout)
        self.kernel = kernel
        self.transposed_backward = bool(transposed_backward)
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.method = method
        self.flex_kernel_options = check_kernel_options(flex_kernel_options)
        self.sparse_kernel = "flex"
        self.last_method: str | None = None
        self._flex_failed = False
        self.comm_stats = CommStats()
        self.last_plan: Plan | StripPlan | None = None
        self._plans: dict = {}
        self._strip_plans: dict = {}
        self._validated: set = set()  # call signatures agreed on across ranks
        self._layouts: dict = {}
        self._op = _GatherOp(self)

    def layout_for(self, seq_len: int, num_heads: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The block layout used for a global sequence of ``seq_len`` (``None``: every block)."""
        if self.pattern is None:
            return self.block_layout
        key = (seq_len, num_heads)
        if key not in self._layouts:
            self._layouts[key] = self.pattern.layout(seq_len, self.block_size, num_heads)
        return self._layouts[key]

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        return_lse: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Block-sparse dilated attention: a key is seen when the layout and the pattern both allow it.

        Args:
            q: ``(B, n, H, D)``, this rank's shard (``n = N`` on one process); float64, float32,
                float16 or bfloat16.
            k: ``(B, n, H_kv, D)``, ``H % H_kv == 0``; same dtype and device as ``q``.
            v: ``(B, n, H_kv, D_v)``.
            is_causal: query ``t`` sees only keys ``s <= t`` (global positions).
            key_padding_mask: bool ``(B, n)``, ``True`` where a key is padding.
            return_lse: also return the log-sum-exp of each query row's scores, ``(B, H, n)``,
                float32 (float64 for float64 inputs).
            cu_seqlens: 1-D integer tensor ``[0, ..., N]``: the global document boundaries of a packed
                batch of one, the same tensor on every rank (documents may cross shards).

        Returns:
            ``(B, n, H, D_v)``: this rank's rows, dtype and device of ``q``; a query whose blocks
            hold no visible key gets 0. :attr:`comm_stats`, :attr:`last_method` and
            :attr:`last_plan` describe the call.
            With ``return_lse``, the pair ``(out, lse)``.
        """
        check_qkv(q, k, v, key_padding_mask)
        rank, world = group_rank_and_size(self.process_group)
        if world > 1 or cu_seqlens is not None:  # every rank agrees on a new call signature (and its documents)
            _agree(
                q, k, v, key_padding_mask, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
                merge=self.merge, block_size=self.block_size, is_causal=is_causal, layout=self.layout,
                process_group=self.process_group, transposed_backward=self.transposed_backward,
                window=self.window_size, cu_seqlens=cu_seqlens, validated=self._validated,
            )  # fmt: skip
        dropout_p = self.dropout if self.training else 0.0
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if self._use_flex(q, world, key_padding_mask, dropout_p, needs_grad, return_lse, cu_seqlens):
            block_layout = self.layout_for(q.shape[1] * world, q.shape[2])
            _, schedule_args = self._prepare(q, k, v, block_layout, bool(is_causal), key_padding_mask, build=False)
            self.comm_stats = CommStats()
            scale = default_scale(q.shape[-1], self.softmax_scale)
            try:
                return self._strip_forward(q, k, v, block_layout, bool(is_causal), rank, world, scale, schedule_args)
            except Exception as exc:
                if self.method == "flex" or world > 1:  # a ring cannot change course on one rank alone
                    raise
                warnings.warn(
                    f"FlexAttention failed ({type(exc).__name__}: {exc}); method='auto' uses the gather path "
                    "from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._flex_failed = True
        out, lse = run_attention(
            self._op, q, k, v, key_padding_mask=key_padding_mask, causal=bool(is_causal), dropout_p=dropout_p,
            lse_grad=return_lse, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        return (out, lse.transpose(1, 2)) if return_lse else out

    def _prepare(self, q, k, v, block_layout, causal: bool, key_padding_mask, build: bool = True, documents=None):
        """Validate everything (before any communication) and build or reuse the gather plan (if ``build``)."""
        return _prepare(
            q, k, v, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
            block_size=self.block_size, block_layout=block_layout, merge=self.merge, is_causal=causal,
            key_padding_mask=key_padding_mask, layout=self.layout, process_group=self.process_group,
            transposed_backward=self.transposed_backward, cache=self._plans, build=build, window=self.window_size,
            documents=documents,
        )  # fmt: skip

    def _gather_schedule(self, q, k, v, call: OpCall) -> BlockSparseSchedule:
        """The gather path's blocks of one call (inside the custom ops: plans and kernels are made here)."""
        mask = call.key_padding_mask
        block_layout = self.layout_for(q.shape[1] * group_rank_and_size(self.process_group)[1], q.shape[2])
        plan, schedule_args = self._prepare(q, k, v, block_layout, call.causal, mask, documents=call.documents)
        self.last_plan, self.last_method = plan, "gather"
        full, masked = _kernels(
            q, k, causal=call.causal, padded=mask is not None, dropout_p=call.dropout_p,
            scale=default_scale(q.shape[-1], self.softmax_scale), kernel=self.kernel, seed=call.seed,
        )  # fmt: skip
        return BlockSparseSchedule(plan, full, masked, key_padding_mask=mask, stats=self.comm_stats, **schedule_args)

    def _strip_forward(self, q, k, v, block_layout, causal: bool, rank: int, world: int, scale: float, schedule_args):
        if self.sparse_kernel not in SPARSE_KERNELS:
            raise ValueError(f"sparse_kernel must be one of {list(SPARSE_KERNELS)}, got {self.sparse_kernel!r}")
        key = (q.shape[1], q.shape[2], k.shape[2], q.dtype, causal, str(q.device), rank, world)
        if key not in self._strip_plans:  # built once per shape: no host work or sync on later calls
            self._strip_plans[key] = build_strip_plan(
                seq_len=q.shape[1] * world, rank=rank, world_size=world, layout_kind=self.layout, q=q,
                num_heads=q.shape[2], num_kv_heads=k.shape[2],
                branch_list=branches(self.segment_lengths, self.dilation_rates, self.merge, q.shape[2]),
                block_size=self.block_size, layout=block_layout, causal=causal,
                kernel_options=self.flex_kernel_options,
            )  # fmt: skip
        plan = self._strip_plans[key]
        kernel = _dense_kernel(q, causal, scale, self.kernel)
        self.last_plan, self.last_method = plan, "flex"
        if world == 1:
            out, _ = strip_attention(q, k, v, StripRun(plan.calls[0], kernel, self.sparse_kernel))
            return out
        schedule = StripRingSchedule(plan, kernel, stats=self.comm_stats, sparse=self.sparse_kernel, **schedule_args)
        out, _ = blockwise_attention(schedule, q, k, v)
        return out

    def _use_flex(
        self,
        q: torch.Tensor,
        world: int,
        key_padding_mask,
        dropout_p: float,
        needs_grad: bool,
        return_lse: bool,
        cu_seqlens=None,
    ) -> bool:
        """Whether the call takes the strips (else the gather path, one op for ``torch.compile``)."""
        if self.method == "gather" or (
            self.method == "auto" and (self._flex_failed or q.device.type != "cuda" or torch.compiler.is_compiling())
        ):
            return False
        if torch.compiler.is_compiling():
            raise ValueError(
                "method='flex' cannot run under torch.compile: the strips keep per-call state from forward to "
                "backward; method='auto' or 'gather' compile (the gather path is one op)"
            )
        chunk = q.shape[1] if world == 1 or self.layout == "contiguous" else q.shape[1] // 2
        reasons = flex_reasons(
            q,
            world_size=world,
            chunk=chunk,
            dilation_rates=self.dilation_rates,
            block_size=self.block_size,
            key_padding_mask=key_padding_mask,
            dropout_p=dropout_p,
            needs_grad=needs_grad and self.sparse_kernel == "flex",
        )
        if return_lse:
            reasons.append("return_lse (the strips' lse has no gradient; the gather path's has)")
        if self.window_size != (-1, -1):
            reasons.append(f"window_size={self.window_size} (the gather path takes sliding windows)")
        if cu_seqlens is not None:
            reasons.append("cu_seqlens (the gather path takes packed documents)")
        if self.method == "flex" and reasons:
            raise ValueError("method='flex' cannot run this call: " + "; ".join(reasons))
        return not reasons and (self.method == "flex" or q.device.type == "cuda")

    def extra_repr(self) -> str:
        pattern = "none" if self.pattern is None else repr(self.pattern)
        window = f", window_size={self.window_size}" if self.window_size != (-1, -1) else ""
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"block_size={self.block_size}, pattern={pattern}, layout={self.layout!r}, merge={self.merge!r}{window}"
        )


def _dense_kernel(q: torch.Tensor, causal: bool, scale: float, name: str | None) -> BlockKernel:
    """The registry's kernel for dense strips (key/value heads expanded to the query's) and the merges."""
    request = KernelRequest.for_tensors(q, q, causal=causal, has_mask=False, dropout_p=0.0)
    return block_kernel(q, q, request=request, softmax_scale=scale, kernel=name)
