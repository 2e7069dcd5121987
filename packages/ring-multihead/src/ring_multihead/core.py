"""The attention core of the fast path (after the projections), one custom op per call.

Every fast-path call, self- or cross-attention, dilated or dense, with or without the
extra keys of ``add_bias_kv`` / ``add_zero_attn``, runs through ring-core's custom ops
(:mod:`ring_core.ops`), so ``torch.compile`` sees one op. Inside it:

- dense attention with nothing else (no padding, no extra keys, no dropout) is one block:
  one kernel call each way, its own output and log-sum-exp are the result (no float32
  accumulators, no merge: what ``nn.MultiheadAttention``'s one SDPA call costs);
- everything else is a schedule of the blockwise engine: the dilated blocks, or one dense
  block of every query against every key (cross-attention), plus one block of the extra
  keys seen by every query, merged by LSE like any other block. Sliding windows and packed
  documents (``cu_seqlens``) restrict the sequence's keys only: the extra keys have no position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ring_core.plugin import (
    NO_WINDOW,
    Accumulator,
    AttentionOp,
    BlockKernel,
    BlockSchedule,
    DilatedSchedule,
    OpCall,
    block_kernel,
    branches,
    check_dilated_config,
    run_attention,
)

__all__ = ["dense_cross_attention", "dilated_attention_with_extra_keys", "sequence_attention"]

EXTRA_BLOCK_ID = 1 << 20  # dropout stream of the extra-keys block, apart from the dilated blocks'


class WithExtraKeys(BlockSchedule):
    """``inner`` on the first ``n`` keys, plus extra keys (``add_bias_kv``, ``add_zero_attn``) seen by every query.

    ``k`` and ``v`` hold the ``n`` sequence keys followed by the extra ones; the
    extra block is merged by LSE like any other block, so results stay exact.
    """

    def __init__(self, inner: BlockSchedule, kernel: BlockKernel, n: int) -> None:
        self.inner, self.kernel, self.n = inner, kernel, n

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: Accumulator) -> None:
        n = self.n
        self.inner.forward(q, k[:, :n], v[:, :n], acc)
        self.kernel.forward_into(acc.out, acc.lse, q, k[:, n:], v[:, n:], block_id=EXTRA_BLOCK_ID)

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
        n = self.n
        self.inner.backward(q, k[:, :n], v[:, :n], out, lse, dout, (dq, dk[:, :n], dv[:, :n]))
        block_dq, block_dk, block_dv = self.kernel.backward(
            dout, q, k[:, n:], v[:, n:], out, lse, block_id=EXTRA_BLOCK_ID
        )
        dq.add_(block_dq)
        dk[:, n:].add_(block_dk)
        dv[:, n:].add_(block_dv)


class CrossSchedule(BlockSchedule):
    """Dense attention of every query to every key: query and key of different lengths (cross-attention)."""

    def __init__(self, kernel: BlockKernel, key_padding_mask: torch.Tensor | None) -> None:
        self.kernel = kernel
        self.mask = None if key_padding_mask is None else (~key_padding_mask)[:, None, None, :]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: Accumulator) -> None:
        self.kernel.forward_into(acc.out, acc.lse, q, k, v, mask=self.mask)

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
        for grad, block_grad in zip(grads, self.kernel.backward(dout, q, k, v, out, lse, mask=self.mask)):
            grad.add_(block_grad)


class _CoreOp(AttentionOp):
    """One configuration of the core: ``segments`` None is dense; ``extra`` keys follow the sequence's in ``k``;
    ``window``: a sliding window (self-attention)."""

    def __init__(
        self,
        segments: tuple[int, ...] | None,
        rates: tuple[int, ...] | None,
        merge: str,
        extra: int,
        window: tuple[int, int] = NO_WINDOW,
    ):
        super().__init__()
        self.segments, self.rates, self.merge, self.extra, self.window = segments, rates, merge, extra, window

    def _one_block(self, q: torch.Tensor, k: torch.Tensor, call: OpCall) -> BlockKernel | None:
        """The kernel when the call is one dense block, else None."""
        dense = self.segments is None or (self.rates == (1,) and self.segments[0] >= q.shape[1])
        positions = self.window != NO_WINDOW or call.documents is not None
        if not dense or positions or self.extra or call.key_padding_mask is not None or call.dropout_p > 0:
            return None
        return None if q.shape[1] == 0 else block_kernel(q, k, causal=call.causal)

    def schedule(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall) -> BlockSchedule:
        n, mask = k.shape[1] - self.extra, call.key_padding_mask
        kernel = block_kernel(
            q, k, causal=call.causal, has_mask=mask is not None, dropout_p=call.dropout_p, seed=call.seed,
            window=self.window != NO_WINDOW,
        )  # fmt: skip
        if q.shape[1] != n:  # cross-attention: dense (forward refuses dilated configurations)
            inner: BlockSchedule = CrossSchedule(kernel, mask)
        else:
            segments: tuple[int, ...] = (max(n, 1),)
            rates: tuple[int, ...] = (1,)
            if self.segments is not None and self.rates is not None:
                segments, rates = self.segments, self.rates
            inner = DilatedSchedule(
                kernel, branches(segments, rates, self.merge, q.shape[2]), causal=call.causal, key_padding_mask=mask,
                window=self.window, documents=call.documents,
            )  # fmt: skip
        return WithExtraKeys(inner, kernel, n) if self.extra else inner

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: OpCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bound = self._one_block(q, k, call)
        if bound is None:
            return super().forward(q, k, v, call)
        out, lse = bound.backend.forward(q, k, v, scale=bound.scale, causal=call.causal)
        return out, lse.transpose(1, 2)

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
        bound = self._one_block(q, k, call)
        if bound is None:
            return super().backward(dout, q, k, v, out, lse, call)
        grads = bound.backend.backward(
            dout.contiguous(), q, k, v, out, lse.transpose(1, 2), scale=bound.scale, causal=call.causal
        )
        dq, dk, dv = (grad.to(x.dtype) for grad, x in zip(grads, (q, k, v)))
        return dq, dk, dv


_ops: dict[tuple[object, ...], _CoreOp] = {}


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _core_op(
    segments: tuple[int, ...] | None,
    rates: tuple[int, ...] | None,
    merge: str,
    extra: int,
    window: tuple[int, int] = NO_WINDOW,
) -> str:
    """The name of the op of one configuration (made once; a constant for ``torch.compile``)."""
    key = (segments, rates, merge, extra, window)
    op = _ops.get(key)
    if op is None:
        op = _ops.setdefault(key, _CoreOp(*key))
    return op.name


def sequence_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    merge: str = "lse",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    window_size: tuple[int, int] = NO_WINDOW,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The core on ``(B, L, H, D)`` queries and ``(B, S, H, D)`` keys and values (``L == S`` unless dense).

    ``segment_lengths=None`` is dense attention. ``extra`` are keys and values ``(B, e, H, D)``
    every query sees once. ``key_padding_mask`` is ``(B, S)``: bool (True = padding) or float
    holding only ``0`` and ``-inf``. ``window_size`` and ``cu_seqlens`` (self-attention, ``B = 1``)
    as in ``ring_core.dilated_attention``. Inputs are assumed checked (as
    ``MultiheadDilatedAttention.forward`` does).
    """
    segments, rates = None, None
    if segment_lengths is not None:
        if dilation_rates is None:
            raise ValueError(f"dilation_rates must be given with segment_lengths={list(segment_lengths)}")
        segments, rates = check_dilated_config(segment_lengths, dilation_rates, merge)
    if extra is not None:
        k, v = torch.cat([k, extra[0]], 1), torch.cat([v, extra[1]], 1)
    op = _core_op(segments, rates, merge, 0 if extra is None else extra[0].shape[1], tuple(window_size))
    out, _ = run_attention(
        op, q, k, v, key_padding_mask=key_padding_mask, causal=is_causal, dropout_p=dropout_p, cu_seqlens=cu_seqlens
    )
    return out


def dilated_attention_with_extra_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: torch.Tensor,
    extra_v: torch.Tensor,
    *,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str = "lse",
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``dilated_attention`` where every query also sees ``extra_k`` / ``extra_v`` (``(B, e, H, D)``), once each."""
    return sequence_attention(
        q, k, v, (extra_k, extra_v), segment_lengths=segment_lengths, dilation_rates=dilation_rates, merge=merge,
        is_causal=is_causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
    )  # fmt: skip


def dense_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Dense attention of ``q`` ``(B, L, H, D)`` to ``k``, ``v`` ``(B, S, H, D)``, any ``L`` and ``S``; O(L+S) memory."""
    return sequence_attention(
        q, k, v, extra, segment_lengths=None, dilation_rates=None, key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
    )  # fmt: skip
