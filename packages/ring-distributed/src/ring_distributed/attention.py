"""RingDistributedDilatedAttention: exact dilated (and dense) attention over a 2-D mesh.

Per call, on each rank of ``P = R * u`` (see :mod:`ring_distributed.mesh`):

1. Ulysses (``u > 1``): an all-to-all inside the Ulysses group turns the ``(B, N/P, H, D)``
   sequence shards into ``(B, N/R, H/u, D)``: the ring-level shard of the sequence (same
   layout, contiguous or zigzag, over ``R`` ranks) for a chunk of ``H/u`` heads.
2. The ring's plan of this rank's head chunk (:func:`ring_core.plugin.build_ring_plan` with
   ``heads=``: each head keeps its dilation offset ``h mod r``), run
   by the ring's schedule over the ring group (``"ring"``, ``"hybrid"``, ``"ulysses"``
   where ``R = 1``), or with K/V all-gathered over the ring group first (``"allgather"``).
3. The all-to-all back.

The blocks run inside ring-core's custom ops (:mod:`ring_core.ops`; with one process the
module's op is the whole call, one op for ``torch.compile``); the all-to-alls and the
all-gather are autograd functions, so gradients are exact too.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ring_core.plugin import (
    Accumulator,
    AttentionOp,
    Block,
    BlockKernel,
    BlockSchedule,
    OpCall,
    Part,
    RingAttentionBase,
    RingComm,
    RingCommStats,
    RingDilatedSchedule,
    RingPlan,
    backward_block,
    block_kernel,
    branches,
    build_ring_plan,
    dropout_seed,
    forward_block,
    group_rank_and_size,
    item_kv_part,
    ring_comm,
    run_attention,
    send_bounds,
    validate_inputs,
)

from .comm import GatherShards, HeadsToSeq, SeqToHeads, gather_mask
from .mesh import (
    STRATEGIES,
    MeshGroups,
    check_positive,
    default_node_size,
    device_mesh_groups,
    mesh_groups,
    resolve_strategy,
    segments_cross_shards,
)

__all__ = ["RingDistributedDilatedAttention"]

_Result = torch.Tensor | tuple[torch.Tensor, torch.Tensor]  # out, or (out, lse) with return_lse


# -- the all-gather schedule -------------------------------------------------------------------------


class AllGatherSchedule(RingDilatedSchedule):
    """The ring's blocks, with every rank's K/V shard already gathered: no P2P, one all-gather.

    ``k`` and ``v`` are the ring group's shards concatenated in rank order,
    ``(B, R * n, H_kv, D)``; ``key_padding_mask`` likewise ``(B, R * n)``.
    """

    def __init__(
        self,
        kernel: BlockKernel,
        plan: RingPlan,
        comm: RingComm,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        shard_len: int,
    ) -> None:
        super().__init__(kernel, plan, comm, causal=causal, key_padding_mask=None)
        self.gathered_mask = key_padding_mask
        self.shard_len = shard_len

    def _shard(self, x: torch.Tensor, source: int) -> torch.Tensor:
        return x.narrow(1, source * self.shard_len, self.shard_len)

    def _blocks(self) -> Iterator[tuple[Block, int]]:
        """``(block, source rank)`` of every block, in a fixed order."""
        plan, rank = self.plan, self.comm.rank
        for block in plan.local_blocks:
            yield block, rank
        for transfer, source in ((plan.local, rank), *((step.recv, step.recv_from) for step in plan.steps)):
            for item in transfer.items:
                yield Block(item.q_part, item_kv_part(transfer, item), window=item.window), source

    def _kv(
        self, part: Part, source: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        mask = None if self.gathered_mask is None else part.key_mask(self._shard(self.gathered_mask, source))
        return part.gather_kv(self._shard(k, source)), part.gather_kv(self._shard(v, source)), mask

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: Accumulator) -> None:
        for index, (block, source) in enumerate(self._blocks()):
            kb, vb, mask = self._kv(block.kv, source, k, v)
            forward_block(
                self.kernel, block.q, q, kb, vb, mask, acc, causal=block.causal, block_id=self.block_base + index,
                window=block.window,
            )  # fmt: skip

    def backward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        dout: torch.Tensor,
        grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        dq, dk, dv = grads
        for index, (block, source) in enumerate(self._blocks()):
            kb, vb, mask = self._kv(block.kv, source, k, v)
            block_dk, block_dv = backward_block(
                self.kernel, block.q, q, kb, vb, mask, out, lse, dout, dq, causal=block.causal,
                block_id=self.block_base + index, window=block.window,
            )  # fmt: skip
            block.kv.add_kv_grad(self._shard(dk, source), block_dk)
            block.kv.add_kv_grad(self._shard(dv, source), block_dv)


class _MeshOp(AttentionOp):
    """The custom ops' side of one call over a mesh: the strategy and groups resolved before the all-to-all."""

    def __init__(self, module: RingDistributedDilatedAttention, strategy: str, groups: MeshGroups) -> None:
        super().__init__(module)
        self.strategy, self.groups = strategy, groups

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        owner: RingDistributedDilatedAttention = self.owner
        owner.comm_stats.calls += 1
        return super().forward(q, k, v, call)

    def schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSchedule:
        owner: RingDistributedDilatedAttention = self.owner
        return owner._mesh_schedule(self.strategy, self.groups, q, k, v, call)


# -- the module ----------------------------------------------------------------------------------------


class RingDistributedDilatedAttention(RingAttentionBase):
    """Exact LongNet dilated (and dense) attention, sequence-parallel over a Ulysses x ring mesh.

    Same arguments and call as :class:`ring_core.RingDilatedAttention` (each rank passes
    its shard ``(B, N/P, H, D)`` in ``layout`` and gets its output shard back; with
    ``return_lse=True`` also its ``lse`` ``(B, H, N/P)``), plus:

    - ``strategy``: ``"ring"`` (P2P ring over all ranks), ``"ulysses"`` (one all-to-all
      group of all ranks: needs ``H`` and ``H_kv`` divisible by ``P``), ``"hybrid"``
      (Ulysses groups of ``ulysses_degree`` inside a node, ring across them),
      ``"allgather"`` (gather K/V over the ring groups, after an optional Ulysses
      all-to-all of ``ulysses_degree``) or ``"auto"`` (see :func:`~ring_distributed.mesh.resolve_strategy`).
    - ``ulysses_degree``: ranks per Ulysses (all-to-all) group for ``"hybrid"`` and
      ``"allgather"`` (``None``: chosen from the node size and the heads).
    - ``process_group`` (``None``: the default group) is split into the mesh, unless
      ``device_mesh`` is given.
    - ``device_mesh``: a 2-D ``DeviceMesh`` with dims ``("ring", "ulysses")``, instead of
      ``process_group``.
    - ``node_size``: ranks per node (default ``LOCAL_WORLD_SIZE``, else all ranks);
      Ulysses groups never straddle nodes.
    - ``transport``: how the ring group's K/V and dK/dV travel, as in
      :class:`ring_core.RingDilatedAttention` (``"nccl"``, or ``"copy_engine"`` when the ring
      group is on one host). :class:`~ring_distributed.RingDilatedAttentionProduction` always
      uses NCCL (its timeouts and buffer pool are NCCL's).
    - ``timeout``: seconds (default ``None``: forever) that any wait for a peer may take before
      :class:`~ring_core.comm.CollectiveError` (naming the rank, the call and the operation).

    The sequence shard index of a rank is its rank in ``process_group`` (with a
    ``device_mesh``: ``ring_index * u + ulysses_index``).
    """

    default_strategy = "auto"

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        merge: str = "lse",
        layout: str = "contiguous",
        process_group: Any = None,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        kernel: str | None = None,
        *,
        strategy: str | None = None,
        ulysses_degree: int | None = None,
        device_mesh: Any = None,
        node_size: int | None = None,
        transport: str = "nccl",
        window_size: tuple[int, int] = (-1, -1),
        timeout: float | None = None,
    ) -> None:
        super().__init__(
            segment_lengths, dilation_rates, merge, layout, process_group, softmax_scale, dropout, kernel,
            transport=transport, window_size=window_size, timeout=timeout,
        )  # fmt: skip
        strategy = self.default_strategy if strategy is None else strategy
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
        self.ulysses_degree = check_positive("ulysses_degree", ulysses_degree, optional=True)
        self.node_size = check_positive("node_size", node_size, optional=True)
        if device_mesh is not None and process_group is not None:
            raise ValueError("pass either process_group or device_mesh, not both")
        self.strategy = strategy
        self.device_mesh = device_mesh
        self.last_strategy: tuple[str, int] | None = None  # (strategy, ulysses degree) of the last call

    # -- mesh and validation -----------------------------------------------------------------------
    def _validation_comms(self) -> list[RingComm]:
        """Groups whose all-gather of descriptors makes every rank agree (the parent, or both mesh dims)."""
        if self.device_mesh is not None:
            groups = device_mesh_groups(self.device_mesh)
            dims = [
                (groups.ulysses_group, groups.ulysses_rank, groups.ulysses_size),
                (groups.ring_group, groups.ring_rank, groups.ring_size),
            ]
            dims = [dim for dim in dims if dim[2] > 1] or [(None, 0, 1)]
        else:
            dims = [(self.process_group, *group_rank_and_size(self.process_group))]
        timeout, context = self.timeout, self.context()
        return [
            RingComm(group, rank, size, RingCommStats(), timeout=timeout, context=context) for group, rank, size in dims
        ]

    def _world_size(self) -> int:
        if self.device_mesh is not None:
            return int(self.device_mesh.mesh.numel())
        return group_rank_and_size(self.process_group)[1]

    def _resolve(self, q: torch.Tensor, k: torch.Tensor) -> tuple[str, MeshGroups]:
        world_size = self._world_size()
        if self.device_mesh is not None:
            groups = device_mesh_groups(self.device_mesh)
            u = groups.ulysses_size
            if self.strategy == "ring" and u > 1:
                raise ValueError(f"strategy='ring' needs a device_mesh with a Ulysses dim of 1, got {u}")
            strategy = self.strategy if self.strategy != "auto" else ("ring" if u == 1 else "hybrid")
            if strategy == "ulysses" and groups.ring_size > 1:
                raise ValueError(f"strategy='ulysses' needs a device_mesh with a ring dim of 1, got {groups.ring_size}")
            resolve_strategy("allgather", u, world_size, world_size, q.shape[2], k.shape[2])  # head checks
            return strategy, groups
        node_size = self.node_size or default_node_size(world_size)
        crosses = segments_cross_shards(
            self.segment_lengths, self.dilation_rates, q.shape[1] * world_size, world_size, self.layout
        )
        strategy, u = resolve_strategy(
            self.strategy, self.ulysses_degree, world_size, node_size, q.shape[2], k.shape[2], crosses_shards=crosses
        )
        return strategy, mesh_groups(self.process_group, u, node_size)

    def _validate(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        causal: bool,
        dropout_p: float,
        cu_seqlens: torch.Tensor | None = None,
        return_lse: bool = False,
    ) -> tuple[int, ...] | None:
        """Every rank checks its inputs and that all ranks agree (on every call, in each group of the mesh); same
        error everywhere. ``return_lse`` is agreed on too (its gradient is one more pass of the backward's
        communication). Returns ``cu_seqlens``' checked values (None without), which the ops reuse instead of
        reading the tensor again."""
        config = (
            self.segment_lengths, self.dilation_rates, self.merge, self.layout, dropout_p, self.strategy,
            self.window_size, bool(return_lse),
        )  # fmt: skip
        return validate_inputs(
            q, k, v, key_padding_mask, world_size=self._world_size(), comms=self._validation_comms,
            cu_seqlens=cu_seqlens, causal=causal, layout=self.layout, merge=self.merge, config=config,
            scale=self.softmax_scale, name=type(self).__name__, window_size=self.window_size,
        )  # fmt: skip

    # -- hooks for RingDilatedAttentionProduction ---------------------------------------------------
    def _make_comm(self, group: Any, rank: int, size: int, device: torch.device) -> RingComm:
        if size == 1:
            return RingComm(group, rank, size, self.comm_stats)
        return ring_comm(group, self.comm_stats, self.transport, device, timeout=self.timeout, context=self.context())

    def _dropout_seed(self) -> int | None:
        """The dropout seed of a call (None: drawn from torch's generator)."""
        return None

    # -- forward -----------------------------------------------------------------------------------
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
    ) -> _Result:
        """Attention over the whole sequence from this rank's shard, by the module's strategy (SPEC.md).

        Args:
            q: ``(B, N/P, H, D)``, this rank's queries (shard index: its rank in the group, or
                ``ring_index * u + ulysses_index`` on a ``device_mesh``); float64, float32, float16
                or bfloat16. ``"ulysses"`` needs ``H`` divisible by the Ulysses degree.
            k: ``(B, N/P, H_kv, D)``, ``H % H_kv == 0``; same dtype and device as ``q``.
            v: ``(B, N/P, H_kv, D_v)``.
            is_causal: query ``t`` sees only keys ``s <= t`` (global positions).
            key_padding_mask: bool ``(B, N/P)``, this rank's shard, ``True`` where a key is padding.
            return_lse: also return the log-sum-exp of each query row's scores, ``(B, H, N/P)``,
                float32 (float64 for float64 inputs).
            cu_seqlens: 1-D integer tensor ``[0, ..., N]``: the global document boundaries of a packed
                batch of one, the same tensor on every rank (documents may cross shards).

        Returns:
            ``(B, N/P, H, D_v)``: this rank's rows of the output, dtype and device of ``q``.
            With ``return_lse``, the pair ``(out, lse)``.
        """
        self.count_step()
        dropout_p = self.dropout if self.training else 0.0
        documents = self._validate(q, k, v, key_padding_mask, bool(is_causal), dropout_p, cu_seqlens, return_lse)
        return self._attend(q, k, v, bool(is_causal), key_padding_mask, dropout_p, return_lse, cu_seqlens, documents)

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        return_lse: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        documents: tuple[int, ...] | None = None,
    ) -> _Result:
        """The call after its checks; ``documents``: ``cu_seqlens``' values as :meth:`_validate` returned them."""
        seed = self._dropout_seed() if dropout_p > 0 else None
        if self._world_size() == 1:  # no mesh: the module's op, one op for torch.compile
            return self.run(
                q, k, v, causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                return_lse=return_lse, seed=seed, cu_seqlens=cu_seqlens, documents=documents,
            )  # fmt: skip
        strategy, groups = self._resolve(q, k)
        u, ring_size = groups.ulysses_size, groups.ring_size
        self.last_strategy = (strategy, u)
        mask = key_padding_mask
        if u > 1:
            args = (groups.ulysses_group, u, self.layout, self.timeout)
            q, k, v = (SeqToHeads.apply(x, *args) for x in (q, k, v))  # type: ignore[no-untyped-call]
            if mask is not None:
                mask = gather_mask(mask, groups.ulysses_group, u, self.layout, self.timeout)
        if strategy == "allgather" and ring_size > 1:
            k, v = (
                GatherShards.apply(x, groups.ring_group, ring_size, self.timeout)  # type: ignore[no-untyped-call]
                for x in (k, v)
            )
            if mask is not None:
                mask = gather_mask(mask, groups.ring_group, ring_size, None, self.timeout)
        if dropout_p > 0:  # each Ulysses rank's heads get their own dropout stream
            seed = (dropout_seed() if seed is None else seed) + groups.ulysses_rank * 7_919 * 1_000_003
        out, lse = run_attention(
            _MeshOp(self, strategy, groups), q, k, v, key_padding_mask=mask, causal=causal, dropout_p=dropout_p,
            lse_grad=return_lse, seed=seed, cu_seqlens=cu_seqlens, documents=documents,
        )  # fmt: skip
        if u > 1:
            args = (groups.ulysses_group, u, self.layout, self.timeout)
            out = HeadsToSeq.apply(out, *args)  # type: ignore[no-untyped-call]
            lse = HeadsToSeq.apply(lse.unsqueeze(-1), *args).squeeze(-1)  # type: ignore[no-untyped-call]
        return (out, lse.transpose(1, 2)) if return_lse else out

    def attention_schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSchedule:
        """One process: the mesh is one rank (the module's op)."""
        strategy, groups = self._resolve(q, k)
        self.last_strategy = (strategy, groups.ulysses_size)
        return self._mesh_schedule(strategy, groups, q, k, v, call)

    def _mesh_schedule(
        self, strategy: str, groups: MeshGroups, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> BlockSchedule:
        """The blocks of this rank's head chunk: ``q`` is ``(B, N/R, H/u, D)``; ``k``, ``v`` are all-gathered
        over the ring group (``(B, N, H_kv/u, D)``) for ``"allgather"``."""
        u, ring_size = groups.ulysses_size, groups.ring_size
        gathered = strategy == "allgather" and ring_size > 1
        local_heads, num_kv_heads = q.shape[2], k.shape[2] * u
        seq_len = q.shape[1] * ring_size
        branch_list = tuple(branches(self.segment_lengths, self.dilation_rates, self.merge, local_heads * u))
        head_start = groups.ulysses_rank * local_heads  # this rank's chunk of heads, global offsets kept
        mask = call.key_padding_mask
        bound = block_kernel(
            q, k, causal=call.causal, has_mask=mask is not None, dropout_p=call.dropout_p,
            softmax_scale=self.softmax_scale, kernel=self.kernel, seed=call.seed, window=self.window_size != (-1, -1),
        )  # fmt: skip
        plan = build_ring_plan(
            seq_len, ring_size, groups.ring_rank, self.layout, branch_list, local_heads * u, num_kv_heads,
            call.causal, q.device, heads=(head_start, head_start + local_heads), window=self.window_size,
            documents=call.documents, native_window=bound.backend.supports_window,
        )  # fmt: skip
        comm = self._make_comm(groups.ring_group, groups.ring_rank, ring_size, q.device)
        if gathered:
            return AllGatherSchedule(bound, plan, comm, causal=call.causal, key_padding_mask=mask, shard_len=q.shape[1])
        return RingDilatedSchedule(
            bound, plan, comm, causal=call.causal, key_padding_mask=mask,
            send_bounds=send_bounds(q, k, v, len(branch_list)),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"merge={self.merge!r}, layout={self.layout!r}, strategy={self.strategy!r}, "
            f"ulysses_degree={self.ulysses_degree}, dropout={self.dropout}"
            + (f", window_size={self.window_size}" if self.window_size != (-1, -1) else "")
        )
