"""Block-sparse dilated attention, on one device or as a sparse ring over a process group.

A key is allowed iff the dilated branches allow it (counted as in SPEC.md) **and** the
block layout does; the softmax runs over the allowed keys through LSE merges. Two ways
compute it: strips (:mod:`ring_blocksparse.strided`: one fused kernel per branch offset on
strided views, at batch 1 a branch's FlexAttention calls batched into one, per ring step too)
and the gather path (:mod:`ring_blocksparse.gather`: tiles gathered into dense blocks;
everything, on any device). Empty (query tile, key tile) pairs
are never computed, and across ranks a rank sends exactly the key/value rows some query
tile of the receiver needs (nothing at all when no tile needs them).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ring_core.plugin import (
    AttentionOp,
    BlockKernel,
    KernelRequest,
    OpCall,
    block_kernel,
    blockwise_attention,
    branches,
    check_dilated_config,
    check_dropout,
    check_flag,
    check_layout,
    check_scale,
    check_timeout,
    check_window,
    default_scale,
    eager_dispatch,
    group_rank_and_size,
    run_attention,
)

from .checks import _agree, _prepare, _remember, layout_digest, layout_identity
from .flex import check_kernel_options, flex_reasons, int32_on, strip_length
from .flex_backward import available as flex_backward_available

# the functional form used to live here: still importable from this module
from .functional import block_sparse_dilated_attention as block_sparse_dilated_attention
from .gather import BlockSparseSchedule, CommStats, _kernels
from .patterns import Pattern, build_pattern, check_block_size
from .plan import Plan
from .strided import (
    SPARSE_KERNELS,
    StripRun,
    document_calls,
    fa4_blocks,
    run_units,
    strip_attention,
    strip_backward,
    strip_forward,
)
from .strip_ring import StripPlan, StripRingSchedule, build_strip_plan, document_plan

METHODS = ("auto", "gather", "flex")


class _GatherOp(AttentionOp):
    """The custom ops' side of the gather path of a :class:`BlockSparseRingDilatedAttention`."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner: BlockSparseRingDilatedAttention = self.owner
        owner.comm_stats = CommStats()  # this call's bytes (its backward adds to them)
        return super().forward(q, k, v, call)

    def schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSparseSchedule:
        owner: BlockSparseRingDilatedAttention = self.owner
        return owner._gather_schedule(q, k, v, call)


class _StripOp(AttentionOp):
    """The custom ops' side of the strips on one process (under ``torch.compile``): the forward keeps no FlexAttention
    graph, the backward runs FlexAttention's backward operator on the final out and lse (where it is off,
    recomputes each such call), as a ring step does; flash-attn 4 and dense calls need nothing kept."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner: BlockSparseRingDilatedAttention = self.owner
        if not owner._flex_failed:
            owner.comm_stats = CommStats()  # this call's bytes (its backward adds to them)
            try:
                with eager_dispatch(), torch.no_grad():
                    run, inputs = self._run(q, k, v, call)
                    run.grad = False
                    out, lse = strip_forward(run, *inputs)
                return _first_rows(out.to(q.dtype), q.shape[1]), _first_rows(lse, q.shape[1])
            except Exception as exc:
                owner._flex_failure(exc)  # (raises for method="flex")
        # the same attention, and either path's backward is exact from the other's out and lse
        return owner._op.forward(q, k, v, call)

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: OpCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.owner._flex_failed:
            return self.owner._op.backward(dout, q, k, v, out, lse, call)  # type: ignore[no-any-return]
        with eager_dispatch(), torch.no_grad():
            run, inputs = self._run(q, k, v, call)
            qs = inputs[0]
            # (rows the strips added: their dout 0, a finite lse)
            out, lse, dout = (_pad_rows(x, qs.shape[1]) for x in (out, lse, dout))
            run.saved = [fa4_blocks(run, c, qs) or None for c in run_units(run, qs)]  # nothing kept but block lists
            grads = strip_backward(run, *inputs, out, lse, dout)
            return tuple(_first_rows(grad, q.shape[1]) for grad in grads)  # type: ignore[return-value]

    def _run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[StripRun, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The call's run and the inputs it runs on (at the strips' length)."""
        owner: BlockSparseRingDilatedAttention = self.owner
        q, k, v, mask, documents, seq_len = owner._at_strip_length(q, k, v, call.key_padding_mask, call.documents)
        run = owner._strips(q, k, v, call.causal, mask, documents, seq_len=seq_len)
        assert isinstance(run, StripRun)  # (a compiled call runs on one process: docs/compile.md)
        return run, (q, k, v)


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
      strided views, at batch 1 one per branch and shape (:mod:`ring_blocksparse.batches`), dense
      strips on the registry's kernel, LSE-merged; on one process and per
      ring step; sliding windows, key padding and packed documents too; needs every rate to divide
      ``block_size``,
      runs of the sequence that split into whole kernel tiles, no dropout, and a backward only on
      CUDA; raises otherwise), ``"gather"`` (tiles gathered into dense blocks, the blockwise
      engine; everything) or ``"auto"`` (flex on CUDA when it applies, else gather). Under
      ``torch.compile`` either is one custom op; there the strips keep no FlexAttention graph from
      forward to backward (as eager where the backward operator is on: ``flex_backward``).
    - ``flex_kernel_options``: FlexAttention ``kernel_options`` (e.g. ``{"fwd_num_stages": 2}``)
      over the safe flags and tuned tiles the strip path picks itself
      (:func:`ring_blocksparse.flex.kernel_options_for`).
    - ``**pattern_options``: the arguments of the named ``pattern`` (e.g. ``window``, ``seed``).

    ``sparse_kernel`` (attribute): ``"auto"`` (flash-attn 4's block-sparse kernels for the strip calls
    they can take, when installed and ``RING_BLOCKSPARSE_FA4`` is not ``0``; FlexAttention for the
    rest), ``"flex"`` (FlexAttention only), or ``"math"`` for the strip path's dense twin (tests: a
    CPU backward). After each call, ``comm_stats`` holds the bytes this rank sent and
    received, ``last_method`` the method and ``last_plan`` the plan.

    Across ranks every call first checks (one small all-gather) that all ranks passed the same
    shapes, flags, configuration and block layout (a pattern's, seed included), else every
    rank raises the same ``RingConfigError``. ``timeout`` (seconds, ``None``: forever) bounds
    every wait for a peer (``CollectiveError`` after). Assigning :attr:`pattern` or
    :attr:`block_layout` (checked like the constructor's), or editing the layout tensor in
    place, takes effect on the next call.
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
        timeout: float | None = None,
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
        if pattern_options and not isinstance(pattern, str):
            raise ValueError(f"pattern options {sorted(pattern_options)} only apply to a pattern given by name")
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._strip_plans: dict[tuple[Any, ...], StripPlan] = {}
        self._layouts: dict[tuple[int, int, int], torch.Tensor] = {}
        self._digests: dict[tuple[int, Hashable] | None, int] = {}
        self._pattern: Pattern | None = None
        self._block_layout: torch.Tensor | None = None
        self.pattern = build_pattern(pattern, **pattern_options) if isinstance(pattern, str) else pattern
        self.block_layout = block_layout
        self.process_group = process_group
        self.merge = merge
        self.softmax_scale = check_scale(softmax_scale)
        self.dropout = check_dropout(dropout)
        self.kernel = kernel
        self.transposed_backward = check_flag("transposed_backward", transposed_backward)
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
        self.method = method
        self.flex_kernel_options = check_kernel_options(flex_kernel_options)
        self.timeout = check_timeout(timeout)
        self.sparse_kernel = "auto"
        self.last_method: str | None = None
        self._flex_failed = False
        self.comm_stats = CommStats()
        self.last_plan: Plan | StripPlan | None = None
        self.step = 0  # calls so far (named in communication errors)
        self._op = _GatherOp(self)
        self._strip_op = _StripOp(self)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (``torch.save`` of a model, a process spawned with it) without what calls built: plans and layouts
        are rebuilt on the next call (a plan's block masks hold rules that are closures, which pickle refuses)."""
        state = self.__dict__.copy()
        for name in ("_plans", "_strip_plans", "_layouts", "_digests"):
            state[name] = {}
        state["last_plan"] = None
        return state

    # A new pattern or layout (assigned, or a layout tensor edited in place: its version changes) must never meet
    # a plan or layout built for the old one: assigning clears them, and cached plans are keyed by the layout
    # tensor's identity and version.
    @property
    def pattern(self) -> Pattern | None:
        """The :class:`~ring_blocksparse.Pattern` that builds the layout (``None``: :attr:`block_layout`)."""
        return self._pattern

    @pattern.setter
    def pattern(self, pattern: str | Pattern | None) -> None:
        if isinstance(pattern, str):
            pattern = build_pattern(pattern)
        elif pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a registered pattern name, a Pattern or None, got {pattern!r}")
        if pattern is not None and self._block_layout is not None:
            raise ValueError("this module has a block_layout: set block_layout = None before giving it a pattern")
        self._pattern = pattern
        self._forget_layouts()

    @property
    def block_layout(self) -> torch.Tensor | None:
        """The explicit block layout (``None``: the pattern's, or every block)."""
        return self._block_layout

    @block_layout.setter
    def block_layout(self, block_layout: torch.Tensor | None) -> None:
        if block_layout is not None and (
            not isinstance(block_layout, torch.Tensor) or block_layout.dtype != torch.bool or block_layout.dim() != 3
        ):
            raise TypeError(f"block_layout must be a bool tensor (H or 1, ceil(N/b), ceil(N/b)), got {block_layout!r}")
        if block_layout is not None and self._pattern is not None:
            raise ValueError("this module has a pattern: set pattern = None before giving it a block_layout")
        self._block_layout = block_layout
        self._forget_layouts()

    def _forget_layouts(self) -> None:
        for cache in (self._plans, self._strip_plans, self._layouts, self._digests):
            cache.clear()

    def layout_for(self, seq_len: int, num_heads: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The block layout used for a global sequence of ``seq_len`` (``None``: every block)."""
        if self.pattern is None:
            return self.block_layout
        key = (seq_len, num_heads, self.block_size)
        if key not in self._layouts:
            with torch.inference_mode(False):  # (kept across calls: a tensor that counts its versions)
                self._layouts[key] = self.pattern.layout(seq_len, self.block_size, num_heads)
        return self._layouts[key]

    def _digest(self, block_layout: torch.Tensor | None) -> int:
        identity = layout_identity(block_layout)
        if identity not in self._digests:
            self._digests[identity] = layout_digest(block_layout)
        return self._digests[identity]

    @property
    def step(self) -> int:
        """Calls so far (named in communication errors)."""
        return int(self._steps)

    @step.setter
    def step(self, value: int) -> None:
        # kept in a tensor and counted with _steps.add_(1): torch.compile specialises on a module's int
        # attributes, so an int counted in forward made every call recompile (a CPU tensor never syncs)
        self._steps = torch.full((), value, dtype=torch.int64)

    def _comm_options(self, world: int) -> dict[str, Any]:
        rank = dist.get_rank() if world > 1 else 0
        return {"timeout": self.timeout, "context": f"{type(self).__name__} rank {rank}, step {self.step}: "}

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
        self._steps.add_(1)
        world = group_rank_and_size(self.process_group)[1]
        dropout_p = self.dropout if self.training else 0.0
        documents = _agree(
            q, k, v, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
            block_size=self.block_size, layout_of=self.layout_for, merge=self.merge, is_causal=is_causal,
            key_padding_mask=key_padding_mask, layout=self.layout, process_group=self.process_group,
            softmax_scale=self.softmax_scale, dropout_p=dropout_p, transposed_backward=self.transposed_backward,
            timeout=self.timeout, name=type(self).__name__, digest=self._digest, window=self.window_size,
            cu_seqlens=cu_seqlens, return_lse=return_lse,
        )  # fmt: skip
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if self._use_flex(q, world, dropout_p, needs_grad, self._strip_length(q, world)):
            if torch.compiler.is_compiling():  # one op for the graph (the strips' Python is no graph)
                out, lse = run_attention(
                    self._strip_op, q, k, v, key_padding_mask=key_padding_mask, causal=bool(is_causal),
                    lse_grad=return_lse, cu_seqlens=cu_seqlens,
                )  # fmt: skip
                return (out, lse.transpose(1, 2)) if return_lse else out
            self.comm_stats = CommStats()  # this call's bytes (its backward adds to them)
            try:
                out, lse = self._run_strips(q, k, v, bool(is_causal), key_padding_mask, documents, return_lse)
                return (out, lse.transpose(1, 2)) if return_lse else out
            except Exception as exc:
                if world > 1:  # a ring cannot change course on one rank alone
                    raise
                self._flex_failure(exc)
        out, lse = run_attention(
            self._op, q, k, v, key_padding_mask=key_padding_mask, causal=bool(is_causal), dropout_p=dropout_p,
            lse_grad=return_lse, cu_seqlens=cu_seqlens, documents=documents,
        )  # fmt: skip
        return (out, lse.transpose(1, 2)) if return_lse else out

    def _run_strips(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        documents: tuple[int, ...] | None,
        lse_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``out`` ``(B, n, H, D)`` and ``lse`` ``(B, n, H)`` of an eager call on the strips."""
        n = q.shape[1]
        q, k, v, key_padding_mask, documents, seq_len = self._at_strip_length(q, k, v, key_padding_mask, documents)
        work = self._strips(q, k, v, causal, key_padding_mask, documents, lse_grad=lse_grad, seq_len=seq_len)
        if isinstance(work, StripRun):
            out, lse = strip_attention(q, k, v, work)
        else:
            out, lse = blockwise_attention(work, q, k, v, lse_grad=lse_grad)
        return _first_rows(out, n), _first_rows(lse, n)

    def _strip_length(self, q: torch.Tensor, world: int) -> int:
        """The rows the strips run this call at: on one process the next length of whole tiles
        (:func:`~ring_blocksparse.flex.strip_length`), in a ring the shard's (which must split into whole tiles)."""
        n = q.shape[1]
        return n if world > 1 else strip_length(n, q.device, self.block_size, self.dilation_rates)

    def _at_strip_length(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        documents: tuple[int, ...] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, ...] | None, int | None]:
        """``(q, k, v, key_padding_mask, documents)`` at :meth:`_strip_length` rows (:func:`_padded`), and the caller's
        ``N`` where rows were added (else None), as :meth:`_strips` takes them."""
        n = q.shape[1]
        length = self._strip_length(q, group_rank_and_size(self.process_group)[1])
        if length == n:
            return q, k, v, key_padding_mask, documents, None
        # whole blocks added to a layout allow nothing (_layout_to): nothing to mask, no per-call cuts
        layout = self.pattern is not None or self.block_layout is not None
        masked = bool(n % self.block_size) or not layout or key_padding_mask is not None or documents is not None
        return (*_padded(q, k, v, key_padding_mask, documents, length, masked=masked), n)

    def _prepare(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        block_layout: torch.Tensor | None,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        build: bool = True,
        documents: tuple[int, ...] | None = None,
    ) -> tuple[Plan | None, dict[str, Any]]:
        """Validate this rank's inputs and build or reuse the gather plan (if ``build``)."""
        return _prepare(
            q, k, v, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
            block_size=self.block_size, block_layout=block_layout, merge=self.merge, is_causal=causal,
            key_padding_mask=key_padding_mask, layout=self.layout, process_group=self.process_group,
            transposed_backward=self.transposed_backward, cache=self._plans, build=build, window=self.window_size,
            documents=documents, **self._comm_options(group_rank_and_size(self.process_group)[1]),
        )  # fmt: skip

    def _gather_schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSparseSchedule:
        """The gather path's blocks of one call (inside the custom ops: plans and kernels are made here)."""
        mask = call.key_padding_mask
        block_layout = self.layout_for(q.shape[1] * group_rank_and_size(self.process_group)[1], q.shape[2])
        plan, schedule_args = self._prepare(q, k, v, block_layout, call.causal, mask, documents=call.documents)
        assert plan is not None  # (built)
        self.last_plan, self.last_method = plan, "gather"
        full, masked = _kernels(
            q, k, causal=call.causal, padded=mask is not None, dropout_p=call.dropout_p,
            scale=default_scale(q.shape[-1], self.softmax_scale), kernel=self.kernel, seed=call.seed,
        )  # fmt: skip
        return BlockSparseSchedule(plan, full, masked, key_padding_mask=mask, stats=self.comm_stats, **schedule_args)

    def _strips(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        documents: tuple[int, ...] | None,
        lse_grad: bool = False,
        seq_len: int | None = None,
    ) -> StripRun | StripRingSchedule:
        """This call's strips: a :class:`StripRun` on one process, else the sparse ring's schedule (the plan built
        once per shape: no host work or sync on later calls). ``documents``: the checked ``cu_seqlens`` values;
        ``lse_grad``: the caller returns ``lse`` with its gradient; ``seq_len``: the caller's ``N`` of inputs
        :func:`_padded` to more rows (one process; the layout is ``N``'s), None: ``q``'s."""
        if self.sparse_kernel not in SPARSE_KERNELS:
            raise ValueError(f"sparse_kernel must be one of {list(SPARSE_KERNELS)}, got {self.sparse_kernel!r}")
        rank, world = group_rank_and_size(self.process_group)
        n = q.shape[1] * world
        seq_len = seq_len or n
        block_layout = self.layout_for(seq_len, q.shape[2])
        schedule_args: dict[str, Any] = {}
        if seq_len == n:  # (padded inputs: one process, checked before padding)
            _, schedule_args = self._prepare(q, k, v, block_layout, causal, key_padding_mask, build=False)
        key = (
            layout_identity(block_layout), q.shape[1], q.shape[2], k.shape[2], q.dtype, causal, str(q.device), rank,
            world, self.segment_lengths, self.dilation_rates, self.merge, self.block_size, self.window_size,
            key_padding_mask is not None, documents is not None, seq_len,
        )  # fmt: skip
        if key not in self._strip_plans:
            plan = build_strip_plan(
                seq_len=n, rank=rank, world_size=world, layout_kind=self.layout, q=q,
                num_heads=q.shape[2], num_kv_heads=k.shape[2],
                branch_list=branches(self.segment_lengths, self.dilation_rates, self.merge, q.shape[2]),
                block_size=self.block_size, layout=_layout_to(block_layout, n, self.block_size), causal=causal,
                kernel_options=self.flex_kernel_options, window=self.window_size, padded=key_padding_mask is not None,
                documents=documents is not None,
            )  # fmt: skip
            _remember(self._strip_plans, key, plan)
        plan = self._strip_plans[key]
        kernel = dense_strip_kernel(q, causal, default_scale(q.shape[-1], self.softmax_scale), self.kernel)
        self.last_plan, self.last_method = plan, "flex"
        bounds = None if documents is None else int32_on(documents, q.device)
        if world == 1:
            return StripRun(
                document_calls(plan.calls[0], documents), kernel, self.sparse_kernel,
                key_padding_mask=key_padding_mask, lse_grad=lse_grad, documents=bounds,
            )  # fmt: skip
        if documents is not None:  # (rows of documents without a query here do not travel)
            plan = document_plan(plan, documents)
        return StripRingSchedule(
            plan, kernel, stats=self.comm_stats, sparse=self.sparse_kernel, key_padding_mask=key_padding_mask,
            documents=bounds, calls=None if documents is None else {
                source: document_calls(calls, documents) for source, calls in plan.calls.items()
            }, **schedule_args,
        )  # fmt: skip

    def _flex_failure(self, exc: Exception) -> None:
        """After the strips failed on one process: re-raise for ``method="flex"``; for ``"auto"`` warn and take the
        gather path from now on."""
        if self.method == "flex":
            raise exc
        warnings.warn(
            f"FlexAttention failed ({type(exc).__name__}: {exc}); method='auto' uses the gather path from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        self._flex_failed = True

    def _use_flex(
        self,
        q: torch.Tensor,
        world: int,
        dropout_p: float,
        needs_grad: bool,
        length: int,
    ) -> bool:
        """Whether the call takes the strips (else the gather path); ``length``: the rows they would run at on one
        process."""
        if self.method == "gather" or (self.method == "auto" and (self._flex_failed or q.device.type != "cuda")):
            return False
        chunk = length if world == 1 else q.shape[1] if self.layout == "contiguous" else q.shape[1] // 2
        reasons = flex_reasons(
            q,
            world_size=world,
            chunk=chunk,
            dilation_rates=self.dilation_rates,
            block_size=self.block_size,
            dropout_p=dropout_p,
            # (FlexAttention's autograd; its backward operator alone runs anywhere: flex_backward)
            needs_grad=needs_grad and self.sparse_kernel != "math" and not flex_backward_available(q),
        )
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


def dense_strip_kernel(q: torch.Tensor, causal: bool, scale: float, name: str | None) -> BlockKernel:
    """The registry's kernel for dense strips (key/value heads expanded to the query's) and the merges, as
    ``method="flex"`` gives it to ``StripRun`` and ``StripRingSchedule``; ``name`` forces a registered kernel
    (None: dispatch on ``q``'s device and dtype)."""
    request = KernelRequest.for_tensors(q, q, causal=causal, has_mask=False, dropout_p=0.0)
    return block_kernel(q, q, request=request, softmax_scale=scale, kernel=name)


def _padded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    documents: tuple[int, ...] | None,
    length: int,
    *,
    masked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, ...] | None]:
    """The inputs at ``length >= N`` rows for the strips: zeros after ``N``, which no query of the caller's sees (one
    more packed document, or padded keys; ``masked=False``: neither, where the layout allows none of them); the
    outputs of those rows are dropped. Exact: every definition of SPEC.md depends on positions, not on ``N``
    (segments are ``floor(t / w)``)."""
    n = q.shape[1]
    q, k, v = (_pad_rows(x, length) for x in (q, k, v))
    if not masked:
        return q, k, v, key_padding_mask, documents
    if documents is not None:
        documents = (*documents, length)
    elif key_padding_mask is None:
        key_padding_mask = torch.zeros(q.shape[0], n, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        key_padding_mask = _pad_rows(key_padding_mask, length, value=True)
    return q, k, v, key_padding_mask, documents


def _pad_rows(x: torch.Tensor, length: int, value: float = 0.0) -> torch.Tensor:
    """``x`` (rows on dim 1) with rows of ``value`` added up to ``length``; ``x`` itself when it has them."""
    extra = length - x.shape[1]
    return x if extra == 0 else torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, extra), value=value)


def _layout_to(block_layout: torch.Tensor | None, seq_len: int, block_size: int) -> torch.Tensor | None:
    """``block_layout`` over ``seq_len`` rows: blocks past its own (rows :func:`_padded` added) allow nothing."""
    blocks = -(-seq_len // block_size)
    if block_layout is None or block_layout.shape[-1] == blocks:
        return block_layout
    extra = blocks - block_layout.shape[-1]
    return torch.nn.functional.pad(block_layout, (0, extra, 0, extra), value=False)


def _first_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x``'s first ``n`` rows (dim 1), contiguous (as a custom op's outputs are described) when rows were added."""
    return x if x.shape[1] == n else x[:, :n].contiguous()
