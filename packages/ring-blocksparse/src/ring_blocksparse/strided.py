"""Block-sparse dilated attention on strips: the calls (one fused kernel call per branch offset), run on one process.

At batch 1 a branch's FlexAttention calls of one shape run as one call (:mod:`ring_blocksparse.batches`); the
loops below run such units (:func:`strip_units`) as they run calls.

Every branch offset is a :class:`StripCall`: strided views of ``q`` and of a key/value buffer (no
gather), the tiles its layout, segments and causality allow, and either a FlexAttention
``BlockMask`` over them or, when the strip is "dense" (every allowed pair is "same run of
the strip", every such pair allowed: plain dilated segments, non-overlapping windows), the dense
kernel of the registry (cuDNN on Hopper) over runs of the strip. Outputs merge by their
log-sum-exps into one accumulator.

Backward: a dense call takes the final ``out``/``lse`` (the engine's rule), and so does a FlexAttention call
where FlexAttention's backward operator can be called alone (:mod:`ring_blocksparse.flex_backward`): the forward
keeps nothing. Elsewhere a FlexAttention call is differentiated through its own ``(o, lse)``: with
``w = exp(lse_call - lse)`` the incoming gradients ``w * dout`` for ``o`` and ``w * rowsum(dout * (o - out))`` for
``lse_call`` make its backward exactly the block's contribution under the final softmax (FlexAttention supports
gradients through its LSE); on one process the forward's graphs are kept, and the ring
(:mod:`ring_blocksparse.strip_ring`) recomputes each step's calls instead.

With flash-attn 4 installed, a call runs on its block-sparse kernels instead of FlexAttention,
the token rule of its partial tiles as a ``mask_mod`` where it needs one (:mod:`ring_blocksparse.fa4`;
backward from the final ``out``/``lse``, like a dense call).

A sliding window is part of every call's tiles and rule (tiles it does not reach are skipped). A key
padding mask is read by the rule; its tiles are known only per call, so a padded call's block mask
is built per call, on the device (:func:`~ring_blocksparse.flex.call_cuts`), and no strip of
it runs dense or on flash-attn 4. Packed documents the same way: their segments and offsets restart at
every document, so the plan ignores segments, each head offset has a call on every strip of its rate
(a document starting at ``c`` is read on the strip of ``(c + offset) % rate``), and each call reads its
rows' segment ids (:func:`~ring_blocksparse.flex.document_segments`: rows of documents it does not serve
match nothing); calls no document needs are not run (:func:`document_calls`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch

from ring_core.plugin import BlockKernel, Branch, branch_offsets, lse_probe, no_double_backward

from .batches import strip_batches
from .fa4 import Fa4Blocks, available, blocks_for, fa4_backward, fa4_forward, rule_ready
from .flex import (
    Cut,
    StripRule,
    block_tile,
    call_cuts,
    finer,
    kernel_options_for,
    sparse_backward,
    strip_block_mask,
    strip_call_forward,
    tile_for,
)
from .flex_backward import call_backward
from .flex_backward import takes as flex_backward_takes
from .strips import UNBOUNDED, Strip, Tiles, classify, runs, strip_of

SPARSE_KERNELS = ("auto", "flex", "math")

# A FlexAttention call's (o, lse) and the leaves its graph starts from (the views the gradients land in).
_Saved = tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]


@dataclass
class StripCall:
    """One kernel call: a query strip against a key strip, for some heads of one branch offset."""

    q: Strip
    k: Strip
    heads: slice
    kv: slice | torch.Tensor  # key/value heads: a slice, or one index per query head
    gqa: bool  # ``kv`` is a slice whose heads each serve a group of query heads
    causal: bool
    covering: bool  # every row and head of q, k and v, in order (the first such call writes the results)
    tiles: Tiles
    rule: StripRule
    run: int | None = None  # dense: the registry's kernel over runs of this many strip rows
    block_mask: Any = None
    kernel_options: dict[str, Any] | None = None
    fa4: Fa4Blocks | bool | None = None  # flash-attn 4's block lists (False: the call needs FlexAttention)
    segment: int = 0  # the branch's segment length (a plan for packed documents cuts segments per call)
    phase: int = 0  # the documents it serves start at this phase modulo the rate (packed documents; else 0)
    # batches this call leads (:func:`~ring_blocksparse.batches.strip_batches`), by their calls' ids
    batches: dict[tuple[int, ...], Any] = field(default_factory=dict, repr=False, compare=False)

    def q_view(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, h, ...)`` strided view of a ``(B, N, H, ...)`` query-side tensor."""
        return x[:, self.q.rows, self.heads]

    def kv_leaf(self, x: torch.Tensor) -> torch.Tensor:
        """The strided view of a key/value buffer that this call reads (its gradient lands there)."""
        rows = x[:, self.k.rows]
        return rows[:, :, self.kv] if isinstance(self.kv, slice) else rows

    def kv_input(self, leaf: torch.Tensor) -> torch.Tensor:
        return leaf if isinstance(self.kv, slice) else leaf.index_select(2, self.kv)


def _kv_heads(
    heads: slice, num_heads: int, num_kv_heads: int, device: torch.device
) -> tuple[slice | torch.Tensor, bool]:
    groups = num_heads // num_kv_heads
    index = torch.arange(num_heads)[heads] // groups
    if groups == 1:
        return heads, False
    steps = index.diff()
    if index.numel() == 1 or bool((steps == steps[0]).all() and steps[0] > 0):
        step = int(steps[0]) if index.numel() > 1 else 1
        return slice(int(index[0]), int(index[-1]) + 1, step), False
    values, counts = torch.unique_consecutive(index, return_counts=True)
    if bool((counts == counts[0]).all() and (values.diff() == 1).all()):
        return slice(int(values[0]), int(values[-1]) + 1), True
    return index.to(device), False


def strip_calls(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    branch_list: Sequence[Branch],
    block_size: int,
    layout: torch.Tensor | None,
    causal: bool,
    q: torch.Tensor,
    dense: bool = True,
    masks: bool = True,
    tile: int | None = None,
    kernel_options: dict[str, Any] | None = None,
    flags: bool = True,
    window: tuple[int, int] = (-1, -1),
    padded: bool = False,
    documents: bool = False,
) -> list[StripCall]:
    """The calls of a query buffer holding ``q_positions`` against a key buffer holding ``k_positions``.

    ``dense``: run dense strips through the registry's kernel; ``masks``: build the block masks
    (not needed to know only which rows are read); ``flags``: pass the kernel flags the masks make
    safe (each distinct set is one more compiled kernel); ``tile`` overrides the kernel's tile (tests).
    ``window``: SPEC.md's ``window_size``; ``padded``: the calls get a key padding mask (their block
    masks are built per call, :func:`sparse_forward`). ``documents``: the calls get packed documents,
    whose segments and offsets restart at each document: the plan's tiles and rule ignore segments (a
    superset of the pairs), each head offset gets a call on every strip of its rate (a document starting at
    ``c`` is read on the strip of ``(c + offset) % rate``: the call's ``phase``), and each call cuts its tiles
    per document (:func:`~ring_blocksparse.flex.call_cuts`); no strip runs dense.
    """
    calls: list[StripCall] = []
    dense = dense and not documents
    per_call = padded or documents  # block masks known only per call
    for branch in branch_list:
        rate = branch.rate
        for offset in branch_offsets(branch):
            first = branch.head_start + (offset - branch.head_start) % rate
            if first >= branch.head_stop:
                continue
            heads = slice(first, branch.head_stop, rate)
            # a document starting at c is read by these heads on the strip of offset (c + offset) % rate: with
            # packed documents every strip may serve them (phase: the strip's offset minus the heads')
            for strip_offset in range(rate) if documents else (offset,):
                call = _strip_call(
                    q_positions, k_positions, branch, strip_offset, heads, num_heads=num_heads,
                    num_kv_heads=num_kv_heads, block_size=block_size, layout=layout, causal=causal, q=q,
                    tile=tile, window=window, padded=padded, documents=documents, user=kernel_options,
                )  # fmt: skip
                if call is None:
                    continue
                call.phase = (strip_offset - offset) % rate
                if dense:
                    call.run = runs(call.tiles, call.q, call.k, call.causal)
                if masks and call.run is None:
                    safe: dict[str, bool] = {}
                    if not per_call:
                        call.block_mask, safe = strip_block_mask(
                            call.tiles, call.rule, len(call.q), len(call.k), q.device
                        )
                    call.kernel_options = kernel_options_for(
                        q, safe if flags else {}, kernel_options, tuned=not (call.tiles.needs_layout or padded),
                        tile=call.tiles.tile,
                    )  # fmt: skip
                calls.append(call)
    calls.sort(key=lambda call: not call.covering)
    return calls


def _strip_call(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    branch: Branch,
    strip_offset: int,
    heads: slice,
    *,
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    layout: torch.Tensor | None,
    causal: bool,
    q: torch.Tensor,
    tile: int | None,
    window: tuple[int, int],
    padded: bool,
    documents: bool,
    user: dict[str, Any] | None = None,
) -> StripCall | None:
    """The call of ``heads`` of ``branch`` on the strips of ``strip_offset`` (None: nothing to compute); on CUDA with
    block tiles where they visit much less (:func:`~ring_blocksparse.flex.finer`; ``user``: the caller's kernel
    options)."""
    rate = branch.rate
    qs, ks = strip_of(q_positions, strip_offset, rate), strip_of(k_positions, strip_offset, rate)
    if qs is None or ks is None:
        raise ValueError(f"the shards do not split into strips of rate {rate} (chunks must start at multiples)")
    if not len(qs) or not len(ks):
        return None
    call_layout = layout
    if layout is not None and layout.shape[0] > 1:
        call_layout = layout[heads]
    segment = UNBOUNDED if documents else branch.segment

    def tiles_of(size: int) -> Tiles:
        return classify(
            qs, ks, call_layout, block_size=block_size, segment=segment, causal=causal, tile=size, window=window,
            padded=padded,
        )  # fmt: skip

    tiles = tiles_of(tile or tile_for(q.device, block_size, rate))
    if tiles.empty:
        return None
    fine = None if tile else block_tile(q.device, block_size, rate, user)
    if fine is not None:
        tiles = finer(tiles, tiles_of(fine))
    kv, gqa = _kv_heads(heads, num_heads, num_kv_heads, q.device)
    covering = (
        rate == 1 and heads == slice(0, num_heads, 1) and len(qs) == len(q_positions) and len(ks) == len(k_positions)
    )
    rule = StripRule(
        qs, ks, call_layout, block_size=block_size, segment=segment, causal=causal, device=q.device, window=window
    )
    return StripCall(qs, ks, heads, kv, gqa, causal, covering, tiles, rule, segment=branch.segment)


def document_calls(calls: list[StripCall], documents: Sequence[int] | None) -> list[StripCall]:
    """The calls packed documents (``cu_seqlens`` values) need: those whose phase some non-empty document starts at
    (all of them without documents)."""
    if documents is None:
        return calls
    starts = [start for start, stop in pairwise(documents) if stop > start]
    return [call for call in calls if any(start % call.q.rate == call.phase for start in starts)]


@dataclass
class StripRun:
    """What one call of the strip path needs besides the tensors."""

    calls: list[StripCall]
    kernel: BlockKernel  # the registry's kernel: dense strips, and the merges
    # "auto": flash-attn 4 for the calls it can take when installed (:mod:`ring_blocksparse.fa4`),
    # FlexAttention for the rest; "flex": FlexAttention only; "math": its dense twin (tests, CPU backward)
    sparse: str = "auto"
    grad: bool = True  # keep the graphs of the FlexAttention calls autograd differentiates (:func:`backward_operator`)
    saved: list[_Saved | Fa4Blocks | None] = field(default_factory=list)
    cuts: list[Cut | None] = field(default_factory=list)  # the forward's per-call cuts, for the backward
    key_padding_mask: torch.Tensor | None = None  # (B, N) bool, True: padded key (the calls were built padded)
    lse_grad: bool = False  # the caller returns ``lse`` with its gradient (``return_lse``)
    documents: torch.Tensor | None = None  # int32 cu_seqlens on the device (the calls were built for documents)
    units: list[Any] = field(default_factory=list)  # what runs: calls and batches of calls (:func:`run_units`)


def backward_operator(run: StripRun, call: Any, q: torch.Tensor) -> bool:
    """Whether the run's FlexAttention ``call`` takes FlexAttention's backward operator alone on the final out and lse
    (:func:`ring_blocksparse.flex_backward.takes`) instead of autograd (always autograd: the dense twin, ``"math"``)."""
    return run.sparse != "math" and flex_backward_takes(call, q)


def strip_units(run: StripRun, calls: list[StripCall], q: torch.Tensor) -> list[Any]:
    """``calls`` as the run executes them: calls of one shape on one kernel (FlexAttention, or flash-attn 4 with one
    ``mask_mod`` variant) batched into one call each (:mod:`ring_blocksparse.batches`), dense calls alone."""
    return strip_batches(calls, q, [_kernel_of(run, call, q) for call in calls])


def _kernel_of(run: StripRun, call: StripCall, q: torch.Tensor) -> str | None:
    """What computes a call: None (dense), ``"flex"``, or flash-attn 4 with its ``mask_mod`` variant and causal flag."""
    if call.run is not None:
        return None
    blocks = fa4_blocks(run, call, q)
    if blocks is None:
        return "flex"
    return f"flash_attn4 {blocks.rule.variant if blocks.rule is not None else 'no rule'} causal={blocks.causal}"


def run_units(run: StripRun, q: torch.Tensor) -> list[Any]:
    """The run's calls as it executes them (:func:`strip_units`), kept in ``run.units``."""
    run.units = strip_units(run, run.calls, q)
    return run.units


def fa4_blocks(run: StripRun, call: Any, q: torch.Tensor) -> Fa4Blocks | None:
    """The call's flash-attn 4 block lists when the run may use them and the call qualifies (kept on the call, or on
    the batch: a batch of FlexAttention calls is made with ``fa4=False``)."""
    if run.sparse != "auto" or call.run is not None or run.documents is not None or not available(q):
        return None  # (a call of packed documents reads its segment ids per call: FlexAttention)
    if call.fa4 is None:
        call.fa4 = blocks_for(call, q.device, rule=rule_ready(q)) or False
    return call.fa4 if isinstance(call.fa4, Fa4Blocks) else None


def sparse_forward(
    run: StripRun, call: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grad: bool, cut: Cut | None
) -> _Saved:
    """One FlexAttention call: ``(o (B, h, n, D), lse (B, h, n), leaves)``; with ``grad`` the graph from the
    leaves (the views the gradients land in) to ``o`` and ``lse`` is kept. ``cut``: the call's
    :class:`~ring_blocksparse.flex.Cut` (:func:`~ring_blocksparse.flex.call_cuts`: key padding, packed documents)."""
    return strip_call_forward(call, q, k, v, scale=run.kernel.scale, grad=grad, math=run.sparse == "math", cut=cut)


def _segments(x: torch.Tensor, length: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """``x`` (``(B, n, ...)``) cut into runs of ``length`` rows: ``[(rows, (B*nseg, length, ...) view)]``."""
    n = x.shape[1]
    full = n - n % length
    for start, stop, size in ((0, full, length), (full, n, n - full)):
        if stop > start:
            yield slice(start, stop), x[:, start:stop].unflatten(1, (-1, size)).flatten(0, 1)


def _dense_kv(call: StripCall, x: torch.Tensor, heads: int) -> torch.Tensor:
    kv = call.kv_input(call.kv_leaf(x))
    return kv.repeat_interleave(heads // kv.shape[2], 2) if kv.shape[2] != heads else kv


def _fold_kv(call: StripCall, grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """A dense call's per-query-head key/value gradient summed back onto its key/value heads (``kv_heads``: the
    buffer's, which a call with one index per query head folds onto)."""
    if call.gqa:
        assert isinstance(call.kv, slice)  # (its heads, each serving an equal group of query heads)
        count = len(range(call.kv.start, call.kv.stop, call.kv.step or 1))
        grouped: torch.Tensor = grad.unflatten(2, (count, -1))  # (Tensor.unflatten is untyped)
        return grouped.sum(3)
    if not isinstance(call.kv, slice):
        folded = grad.new_zeros(*grad.shape[:2], kv_heads, grad.shape[-1])
        return folded.index_add_(2, call.kv, grad)
    return grad


def strip_forward(
    run: StripRun, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` (B, N, H, D) and ``lse`` (B, N, H) of the calls in ``run``; ``run.saved`` keeps what the backward
    needs of each unit (:func:`run_units`; a FlexAttention call's graph only when ``run.grad``)."""
    b, n, h, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else acc
    backend = run.kernel.backend
    lse = torch.full((b, n, h), float("-inf"), dtype=acc, device=q.device)
    units = run_units(run, q)
    covered = bool(units) and units[0].covering
    out = (torch.empty if covered else torch.zeros)(b, n, h, v.shape[-1], dtype=out_dtype, device=q.device)
    run.saved = []
    cuts = run.cuts = call_cuts(units, run.key_padding_mask, run.documents)
    for index, call in enumerate(units):
        write = index == 0 and covered
        pieces: list[tuple[slice, torch.Tensor, torch.Tensor]]
        blocks = fa4_blocks(run, call, q)
        if call.run is not None:
            pieces = _dense_pieces(run, call, q, k, v)
            run.saved.append(None)
        elif blocks is not None:
            o, lse_call = fa4_forward(call, blocks, q, k, v, scale=run.kernel.scale)
            pieces = [(slice(None), o, lse_call.transpose(1, 2))]
            run.saved.append(blocks)
        else:
            keep = run.grad and not backward_operator(run, call, q)  # (its graph, for autograd's backward)
            o, lse_call, leaves = sparse_forward(run, call, q, k, v, grad=keep, cut=cuts[index])
            pieces = [(slice(None), o.transpose(1, 2), lse_call.transpose(1, 2))]
            run.saved.append((o, lse_call, leaves) if keep else None)
        for rows, o_rows, lse_rows in pieces:
            out_view, lse_view = call.q_view(out)[:, rows], call.q_view(lse)[:, rows]
            if write:
                out_view.copy_(o_rows.reshape(out_view.shape))
                lse_view.copy_(lse_rows.reshape(lse_view.shape))
            else:
                backend.merge(out_view, lse_view, o_rows.reshape(out_view.shape), lse_rows.reshape(lse_view.shape))
    return out, lse


def strip_backward(
    run: StripRun,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dq, dk, dv`` of :func:`strip_forward`'s ``run`` (``dlse``: the gradient of its ``lse``, or None); a
    FlexAttention call whose graph the forward did not keep runs the backward operator alone, or where that
    cannot run is recomputed (as a ring step's is)."""
    dout = dout.contiguous()
    # the lse's gradient: a FlexAttention call takes it through its own lse; a dense or flash-attn 4 call (its
    # backward starts from the final out/lse) by one more backward pass with ring_core's lse_probe
    passes = any(c.run is not None or isinstance(saved, Fa4Blocks) for c, saved in zip(run.units, run.saved))
    probes = lse_probe(v, out, dlse) if dlse is not None and passes else None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grad_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else acc
    grads: list[torch.Tensor | None] = [None, None, None]
    backend = run.kernel.backend
    recompute = any(saved is None and call.run is None for call, saved in zip(run.units, run.saved))
    # the forward's cuts (a compiled op's backward builds its run afresh, without them)
    cuts = run.cuts or (call_cuts(run.units, run.key_padding_mask, run.documents) if recompute else [])
    for index, (call, saved) in enumerate(zip(run.units, run.saved)):
        if call.run is not None:
            blocks = _dense_backward(run, call, q, k, v, out, lse, dout)
            if probes is not None:
                probe, zero_v, shifted = probes
                blocks = _with_lse(blocks, _dense_backward(run, call, q, k, zero_v, shifted, lse, probe))
        elif isinstance(saved, Fa4Blocks):
            scale = run.kernel.scale
            blocks = [(slice(None), *fa4_backward(call, saved, q, k, v, out, lse, dout, scale=scale))]
            if probes is not None:
                probe, zero_v, shifted = probes
                lse_grads = fa4_backward(call, saved, q, k, zero_v, shifted, lse, probe, scale=scale)
                blocks = _with_lse(blocks, [(slice(None), *lse_grads)])
        elif saved is None and backward_operator(run, call, q):  # FlexAttention's backward kernel alone
            grads_of_call = call_backward(
                call, q, k, v, out, lse, dout, scale=run.kernel.scale, cut=cuts[index], dlse=dlse
            )
            blocks = [(slice(None), *grads_of_call)]
        else:
            if saved is None:  # the call's forward again, for autograd's graph
                saved = sparse_forward(run, call, q, k, v, grad=True, cut=cuts[index])
            o, lse_call, leaves = saved
            blocks = [(slice(None), *sparse_backward(call, o, lse_call, leaves, dout, out, lse, dlse))]
        for i, (x, view) in enumerate(((q, call.q_view), (k, call.kv_leaf), (v, call.kv_leaf))):
            for rows, *parts in blocks:
                part = parts[i]
                owns = index == 0 and call.covering and len(blocks) == 1 and part.dtype == grad_dtype
                grad = grads[i]
                if grad is None and owns:
                    grads[i] = part.reshape(x.shape)  # the covering call's gradient is where the others add
                    continue
                if grad is None:
                    grad = grads[i] = torch.zeros(x.shape, dtype=grad_dtype, device=x.device)
                target = view(grad)[:, rows]
                backend.accumulate(target, part.reshape(target.shape))
    run.saved, run.cuts = [], []
    dq, dk, dv = (torch.zeros_like(x) if g is None else g.to(x.dtype) for x, g in zip((q, k, v), grads))
    return dq, dk, dv


class _StripAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, run: StripRun, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = strip_forward(run, q, k, v)
        ctx.run = run
        ctx.save_for_backward(q, k, v, out, lse)
        if not run.lse_grad:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @no_double_backward
    def backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        run: StripRun = ctx.run
        q, k, v, out, lse = ctx.saved_tensors
        return None, *strip_backward(run, q, k, v, out, lse, dout, dlse if run.lse_grad else None)


def _with_lse(blocks: list[tuple[Any, ...]], lse_blocks: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``blocks`` ``(rows, dq, dk, dv)`` with the lse pass's ``dq`` and ``dk`` added (its ``dv`` is 0)."""
    return [(r, bq + pq, bk + pk, bv) for (r, bq, bk, bv), (_, pq, pk, _) in zip(blocks, lse_blocks)]


def _dense_pieces(
    run: StripRun, call: StripCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """A dense call forward: ``[(rows of the strip, out (B', L, h, D), lse (B', L, h))]`` per run length."""
    assert call.run is not None  # (a dense call)
    kernel = run.kernel
    heads = call.q_view(q).shape[2]
    kk, vv = _dense_kv(call, k, heads), _dense_kv(call, v, heads)
    pieces = []
    run_len = call.run
    for (rows, qs), (_, ks), (_, vs) in zip(*(_segments(x, run_len) for x in (call.q_view(q), kk, vv))):
        o, lse = kernel.backend.forward(qs, ks, vs, scale=kernel.scale, causal=call.causal)
        pieces.append((rows, o, lse.transpose(1, 2)))
    return pieces


def _dense_backward(
    run: StripRun,
    call: StripCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
) -> list[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    assert call.run is not None  # (a dense call)
    kernel = run.kernel
    heads = call.q_view(q).shape[2]
    kk, vv = _dense_kv(call, k, heads), _dense_kv(call, v, heads)
    blocks = []
    views = (call.q_view(dout), call.q_view(q), kk, vv, call.q_view(out), call.q_view(lse))
    run_len = call.run
    for pieces in zip(*(_segments(x, run_len) for x in views)):
        rows = pieces[0][0]
        do, qs, ks, vs, os, ls = (piece for _, piece in pieces)
        bq, bk, bv = kernel.backend.backward(
            do, qs, ks, vs, os, ls.transpose(1, 2), scale=kernel.scale, causal=call.causal
        )
        b = q.shape[0]
        bk, bv = (_fold_kv(call, x.unflatten(0, (b, -1)).flatten(1, 2), k.shape[2]) for x in (bk, bv))
        blocks.append((rows, bq.unflatten(0, (b, -1)).flatten(1, 2), bk, bv))
    return blocks


def strip_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run: StripRun
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out`` (B, N, H, D) and ``lse`` (B, N, H) of the calls in ``run`` (one process). The forward keeps no graph of
    a FlexAttention call whose backward runs FlexAttention's backward operator on the final out and lse
    (:func:`backward_operator`); it keeps the other calls' graphs for the backward, except under saved-tensor hooks
    (activation checkpointing, offloading: the graphs would hold what the hooks manage), where the backward
    recomputes each such call."""
    hooked = torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    run.grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)) and not hooked
    out, lse = _StripAttention.apply(run, q, k, v)  # type: ignore[no-untyped-call]
    return out.to(q.dtype), lse
