"""``RingMultiheadDilatedAttention``: the ``nn.MultiheadAttention`` drop-in, sequence-parallel.

Each rank of ``process_group`` passes its shard of the sequence (``layout``
``"contiguous"`` or ``"zigzag"``, SPEC.md) as ``query``/``key``/``value`` and of
``key_padding_mask``, and gets its shard of the output. The projections are
per-token, so only the attention core communicates: ``ring_core``'s
``RingDilatedAttention`` on the fast path; on the dense path
(``need_weights=True``, float key padding) keys and values are all-gathered
(short sequences only, as for the single-device module). Parameter gradients
are this rank's contribution: sum them over the group (as DDP does) to train.
With one rank it is exactly :class:`MultiheadDilatedAttention`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from ring_core.plugin import (
    RingComm,
    RingCommStats,
    RingConfigError,
    RingDilatedAttention,
    agree_across_ranks,
    check_cu_seqlens,
    check_layout,
    check_timeout,
    differing_fields,
    group_rank_and_size,
    read_cu_seqlens,
    shard_positions,
    unshard_sequence,
)

from .multihead import MultiheadDilatedAttention


class RingMultiheadDilatedAttention(MultiheadDilatedAttention):
    """:class:`MultiheadDilatedAttention` over a sequence sharded on the ranks of ``process_group``.

    Extra keyword arguments: ``process_group`` (None: the default group, or one
    process without ``torch.distributed``), ``layout`` and ``timeout`` (seconds any wait
    for a peer may take, else :class:`~ring_core.comm.CollectiveError`; default ``None``:
    forever). Inputs are this rank's
    shard; ``N = P * local length`` must satisfy SPEC.md's divisibility. Across
    ranks, ``attn_mask`` must be None (use ``is_causal=True``), key and query
    shards have the same length, and ``add_bias_kv`` / ``add_zero_attn`` need the
    dense path (``need_weights=True``).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        merge: str = "lse",
        layer_norm: bool = False,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        process_group: Any = None,
        layout: str = "contiguous",
        window_size: tuple[int, int] = (-1, -1),
        timeout: float | None = None,
    ) -> None:
        super().__init__(
            embed_dim,
            num_heads,
            dropout,
            bias,
            add_bias_kv,
            add_zero_attn,
            kdim,
            vdim,
            batch_first,
            device,
            dtype,
            segment_lengths=segment_lengths,
            dilation_rates=dilation_rates,
            merge=merge,
            layer_norm=layer_norm,
            layer_norm_eps=layer_norm_eps,
            gamma_init=gamma_init,
            window_size=window_size,
        )
        self.process_group = process_group
        self.layout = check_layout(layout)
        self.timeout = check_timeout(timeout)
        # during a call: whether some rank's key_padding_mask holds other values than 0 / -inf (then every rank
        # keeps its shard a float mask: the ranks take one path, and the gathered mask is of one kind)
        self._float_padding = False
        # ring_core RingDilatedAttention per configuration
        self._rings: dict[tuple[object, ...], RingDilatedAttention] = {}

    def _world(self) -> tuple[int, int]:
        """``(rank, P)`` in ``process_group``; ``(0, 1)`` without torch.distributed."""
        return group_rank_and_size(self.process_group)

    def _global_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        rank, world = self._world()
        if world == 1:
            return super()._global_keys(q, k, v, key_padding_mask)
        n = q.shape[1] * world
        k = unshard_sequence(k, self.layout, self.process_group, dim=1)
        v = unshard_sequence(v, self.layout, self.process_group, dim=1)
        if key_padding_mask is not None:
            gathered = unshard_sequence(key_padding_mask.to(torch.float64), self.layout, self.process_group, dim=1)
            key_padding_mask = gathered.bool() if key_padding_mask.dtype == torch.bool else gathered
        positions = shard_positions(n, rank, world, self.layout).to(q.device)
        return k, v, key_padding_mask, positions, n

    def _global_length(self, length: int) -> int:
        return length * self._world()[1]

    def _sequence_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        dropout_p: float,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _, world = self._world()
        if world == 1:
            return super()._sequence_attention(
                q, k, v, extra, is_causal=is_causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                cu_seqlens=cu_seqlens,
            )  # fmt: skip
        segments, rates = self._config(q.shape[1] * world)
        key = (segments, rates, dropout_p)
        ring = self._rings.get(key)
        if ring is None:
            ring = RingDilatedAttention(
                segments,
                rates,
                merge=self.merge,
                layout=self.layout,
                process_group=self.process_group,
                dropout=dropout_p,
                window_size=self.window_size,
                timeout=self.timeout,
            )
            self._rings[key] = ring
        out: torch.Tensor = ring(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens)
        return out

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`MultiheadDilatedAttention.forward`, on this rank's shard of the sequence.

        Across ranks every rank checks its inputs, then one small ``all_gather`` makes
        every rank raise when any rank's inputs (or the ranks' calls) disagree: an
        error never leaves the other ranks waiting in a collective.

        Args:
            query: this rank's shard, ``(L_local, B, E)`` or ``(B, L_local, E)`` with
                ``batch_first=True``, in ``layout``; float64, float32, float16 or bfloat16.
            key: this rank's key shard, the same length as ``query``'s (self-attention).
            value: this rank's value shard.
            key_padding_mask: bool ``(B, L_local)``, this rank's shard, ``True`` where padding.
            need_weights: return this rank's rows of the weights (dense: short sequences only).
            attn_mask: must be ``None`` across ranks; use ``is_causal=True``.
            average_attn_weights: average the returned weights over the heads.
            is_causal: causal attention over the global positions.
            cu_seqlens: the global document boundaries ``[0, ..., N]`` of a packed batch of one, the
                same tensor on every rank (documents may cross shards).

        Returns:
            This rank's rows of ``attn_output`` (shaped like ``query``) and, with
            ``need_weights=True``, of the weights, ``(B, L_local, N)``; else ``None``.
        """
        _, world = self._world()
        if world > 1:
            self._float_padding = self._check_across_ranks(
                world, query, key, value, key_padding_mask, need_weights, attn_mask, is_causal, cu_seqlens
            )
        try:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
                cu_seqlens=cu_seqlens,
            )  # fmt: skip
        finally:
            self._float_padding = False

    def _key_padding_mask(self, mask: torch.Tensor | None, b: int, s: int, batched: bool) -> torch.Tensor | None:
        """As the single-device module's, but a float mask on every rank when some rank's holds other values."""
        mask = super()._key_padding_mask(mask, b, s, batched)
        if mask is not None and mask.dtype == torch.bool and self._float_padding:
            return torch.zeros(mask.shape, dtype=self.out_proj.weight.dtype, device=mask.device).masked_fill(
                mask, float("-inf")
            )
        return mask

    def _check_local(
        self,
        world: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[int, int, bool]:
        """This rank's checks; returns ``(batch, local length, whether key_padding_mask holds other values than
        0 / -inf)``."""
        batched = self._check_inputs(query, key, value)
        if attn_mask is not None:
            raise ValueError(
                f"attn_mask is not supported across {world} ranks (got shape {tuple(attn_mask.shape)}); "
                "pass attn_mask=None and is_causal=True for causal attention"
            )
        if not need_weights and (self.bias_k is not None or self.add_zero_attn):
            raise ValueError(
                f"add_bias_kv / add_zero_attn across {world} ranks need the dense path: pass need_weights=True "
                "(short sequences), or use one rank"
            )
        seq_dim = 0 if (not batched or not self.batch_first) else 1
        local_q, local_k = query.shape[seq_dim], key.shape[seq_dim]
        if local_q != local_k:
            raise ValueError(
                f"across ranks query and key shards must have the same length, got {local_q} and {local_k}"
            )
        if self.layout == "zigzag" and local_q % 2:
            raise ValueError(
                f"layout='zigzag' needs N divisible by 2*P: each rank's shard must have an even length, got {local_q}"
            )
        batch = query.shape[1 - seq_dim] if batched else 1
        padding = self._key_padding_mask(key_padding_mask, batch, local_k, batched)
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, local_q * world, batch)
        return batch, local_q, padding is not None and padding.dtype != torch.bool

    def _check_across_ranks(
        self,
        world: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        cu_seqlens: torch.Tensor | None = None,
    ) -> bool:
        """Every rank raises when any rank's inputs are bad or the calls differ; returns whether some rank's
        ``key_padding_mask`` is a float mask of other values than 0 / -inf (each rank sees only its shard)."""

        def check() -> list[int]:
            batch, length, general = self._check_local(
                world, query, key, value, key_padding_mask, need_weights, attn_mask, cu_seqlens
            )
            documents = None if cu_seqlens is None else read_cu_seqlens(cu_seqlens)
            crc = zlib.crc32(repr(documents).encode())
            return [1, batch, length, int(bool(need_weights)), int(bool(is_causal)), crc, int(general)]

        fields = ("ok", "batch size", "local length", "need_weights", "is_causal", "cu_seqlens")
        comm = RingComm.for_group(self.process_group, RingCommStats())
        comm.timeout = self.timeout
        table = agree_across_ranks(check, (*fields, "float key_padding_mask"), comm, name=type(self).__name__)
        differing, details = differing_fields(table, fields)
        if differing:
            raise RingConfigError(f"{type(self).__name__}: the ranks' calls differ: {details}; nothing was computed")
        return any(row[len(fields)] for row in table)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layout={self.layout!r}"
