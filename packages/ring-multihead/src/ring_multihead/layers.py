"""Transformer layers on dilated attention: drop-ins for ``nn.TransformerEncoderLayer`` / ``DecoderLayer``.

Same constructor arguments (in torch's order), parameter names and shapes (an
``nn.Transformer*Layer`` state_dict loads), and forward signature. The
self-attention is :class:`~ring_multihead.MultiheadDilatedAttention`; keyword-only
extras choose the LongNet configuration, MAGNETO's sub-LayerNorm and init, and
the ring:

- ``segment_lengths``, ``dilation_rates``, ``merge``: as for the attention
  (``None``: dense, i.e. exactly torch's layer);
- ``sub_layer_norm``: MAGNETO's sub-LN, a LayerNorm before the attention's
  ``out_proj`` (``self_attn.norm``) and one between the feed-forward activation
  and ``linear2`` (``ffn_norm``). MAGNETO is ``norm_first=True`` with it;
- ``gamma_init``: MAGNETO's init (:mod:`ring_multihead.magneto`): ``xavier_normal_``
  with gain ``gamma`` for the value and output projections and both feed-forward
  layers, biases zero. ``None`` keeps torch's default init of the linear layers;
- ``process_group``: None runs on one device; a process group shards the sequence
  over its ranks (:class:`~ring_multihead.RingMultiheadDilatedAttention`, ``layout``
  ``"contiguous"`` or ``"zigzag"``). Each rank passes its shard; parameter
  gradients are this rank's contribution (sum them over the group).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .multihead import MultiheadDilatedAttention
from .ring import RingMultiheadDilatedAttention

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def _activation(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}")
        return ACTIVATIONS[activation]
    if not callable(activation):
        raise TypeError(f"activation must be a string or a callable, got {activation!r}")
    return activation


def self_attention(
    d_model: int,
    nhead: int,
    dropout: float,
    bias: bool,
    batch_first: bool,
    factory: dict[str, Any],
    *,
    segment_lengths: Sequence[int] | None,
    dilation_rates: Sequence[int] | None,
    merge: str,
    sub_layer_norm: bool,
    layer_norm_eps: float,
    gamma_init: float | None,
    process_group: Any,
    layout: str,
) -> MultiheadDilatedAttention:
    """The dilated self-attention of a layer: the ring variant when ``process_group`` is given."""
    options: dict[str, Any] = {
        "segment_lengths": segment_lengths,
        "dilation_rates": dilation_rates,
        "merge": merge,
        "layer_norm": sub_layer_norm,
        "layer_norm_eps": layer_norm_eps,
        "gamma_init": 1.0 if gamma_init is None else gamma_init,
    }
    if process_group is not None:
        return RingMultiheadDilatedAttention(
            d_model, nhead, dropout, bias, batch_first=batch_first, **factory, **options,
            process_group=process_group, layout=layout,
        )  # fmt: skip
    if layout != "contiguous":
        raise ValueError(f"layout={layout!r} needs a process_group (the sequence is not sharded without one)")
    return MultiheadDilatedAttention(d_model, nhead, dropout, bias, batch_first=batch_first, **factory, **options)


class DilatedLayerBase(nn.Module):
    """What both layers share: the self-attention block and the feed-forward network.

    The feed-forward network is ``linear2(dropout(ffn_norm(activation(linear1(x)))))``
    with torch's names; ``ffn_norm`` exists only with the sub-LayerNorm.
    """

    self_attn: MultiheadDilatedAttention
    dropout1: nn.Dropout
    activation: Callable[[torch.Tensor], torch.Tensor]

    def _build_feed_forward(
        self,
        d_model: int,
        dim_feedforward: int,
        dropout: float,
        activation: str | Callable[[torch.Tensor], torch.Tensor],
        layer_norm_eps: float,
        bias: bool,
        sub_layer_norm: bool,
        gamma_init: float | None,
        factory: dict[str, Any],
    ) -> None:
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.ffn_norm = (
            nn.LayerNorm(dim_feedforward, eps=layer_norm_eps, bias=bias, **factory) if sub_layer_norm else None
        )
        self.activation = _activation(activation)
        if gamma_init is not None:
            for layer in (self.linear1, self.linear2):
                nn.init.xavier_normal_(layer.weight, gain=gamma_init)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def _sa_block(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, is_causal: bool
    ) -> torch.Tensor:
        out = self.self_attn(
            x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False, is_causal=is_causal
        )[0]
        dropped: torch.Tensor = self.dropout1(out)
        return dropped

    def _ff_block(self, x: torch.Tensor, out_dropout: nn.Dropout) -> torch.Tensor:
        h = self.activation(self.linear1(x))
        if self.ffn_norm is not None:
            h = self.ffn_norm(h)
        out: torch.Tensor = out_dropout(self.linear2(self.dropout(h)))
        return out


class DilatedTransformerEncoderLayer(DilatedLayerBase):
    """A drop-in for ``nn.TransformerEncoderLayer`` with dilated (optionally ring) self-attention.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``:
    ``is_causal=True`` alone (no ``src_mask``) is causal attention (torch needs the mask
    too). Across ranks ``src_mask`` must be None. See the module docstring for the
    keyword-only extras.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        merge: str = "lse",
        sub_layer_norm: bool = False,
        gamma_init: float | None = None,
        process_group: Any = None,
        layout: str = "contiguous",
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.self_attn = self_attention(
            d_model, nhead, dropout, bias, batch_first, factory, segment_lengths=segment_lengths,
            dilation_rates=dilation_rates, merge=merge, sub_layer_norm=sub_layer_norm,
            layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, process_group=process_group, layout=layout,
        )  # fmt: skip
        self._build_feed_forward(
            d_model, dim_feedforward, dropout, activation, layer_norm_eps, bias, sub_layer_norm, gamma_init, factory
        )
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self,
        src: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        src_key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """``nn.TransformerEncoderLayer.forward``: self-attention and feed-forward, with residuals.

        Args:
            src: ``(S, B, E)``, or ``(B, S, E)`` with ``batch_first=True`` (this rank's shard of the
                sequence across ranks); the layer's dtype (float64, float32, float16 or bfloat16).
            src_mask: ``(S, S)`` attention mask, bool (``True``: not allowed) or float (added);
                ``None`` across ranks.
            src_key_padding_mask: ``(B, S)``, ``True`` where a position is padding.
            is_causal: causal self-attention (alone, without ``src_mask``).

        Returns:
            The output, shaped like ``src``, in its dtype.
        """
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._ff_block(self.norm2(x), self.dropout2)
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        out: torch.Tensor = self.norm2(x + self._ff_block(x, self.dropout2))
        return out


class DilatedTransformerDecoderLayer(DilatedLayerBase):
    """A drop-in for ``nn.TransformerDecoderLayer`` with dilated (optionally ring) self-attention.

    ``forward(tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False)``. The
    cross-attention (``multihead_attn``) is dense, over the whole ``memory`` of any length.
    Across ranks, ``tgt`` is this rank's shard and ``memory`` the whole memory on every
    rank (its gradient, like the parameters', is this rank's contribution), and
    ``tgt_mask`` must be None (``tgt_is_causal=True`` for causal self-attention).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[torch.Tensor], torch.Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        merge: str = "lse",
        sub_layer_norm: bool = False,
        gamma_init: float | None = None,
        process_group: Any = None,
        layout: str = "contiguous",
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.self_attn = self_attention(
            d_model, nhead, dropout, bias, batch_first, factory, segment_lengths=segment_lengths,
            dilation_rates=dilation_rates, merge=merge, sub_layer_norm=sub_layer_norm,
            layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, process_group=process_group, layout=layout,
        )  # fmt: skip
        self.multihead_attn = MultiheadDilatedAttention(
            d_model, nhead, dropout, bias, batch_first=batch_first, **factory, layer_norm=sub_layer_norm,
            layer_norm_eps=layer_norm_eps, gamma_init=1.0 if gamma_init is None else gamma_init,
        )  # fmt: skip
        self._build_feed_forward(
            d_model, dim_feedforward, dropout, activation, layer_norm_eps, bias, sub_layer_norm, gamma_init, factory
        )
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def _mha_block(
        self,
        x: torch.Tensor,
        memory: torch.Tensor,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        out = self.multihead_attn(
            x, memory, memory, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
            is_causal=is_causal,
        )[0]  # fmt: skip
        dropped: torch.Tensor = self.dropout2(out)
        return dropped

    def forward(
        self,
        tgt: torch.Tensor,
        memory: torch.Tensor,
        tgt_mask: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        tgt_key_padding_mask: torch.Tensor | None = None,
        memory_key_padding_mask: torch.Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> torch.Tensor:
        """``nn.TransformerDecoderLayer.forward``: self-attention, cross-attention to ``memory``, feed-forward.

        Args:
            tgt: ``(T, B, E)``, or ``(B, T, E)`` with ``batch_first=True`` (this rank's shard across
                ranks); the layer's dtype (float64, float32, float16 or bfloat16).
            memory: ``(M, B, E)`` (batch-first likewise), the whole memory on every rank.
            tgt_mask: ``(T, T)`` self-attention mask, bool (``True``: not allowed) or float;
                ``None`` across ranks.
            memory_mask: ``(T, M)`` cross-attention mask.
            tgt_key_padding_mask: ``(B, T)``, ``True`` where a target position is padding.
            memory_key_padding_mask: ``(B, M)``, ``True`` where a memory position is padding.
            tgt_is_causal: causal self-attention (alone, without ``tgt_mask``).
            memory_is_causal: a hint that ``memory_mask`` is causal, as in torch.

        Returns:
            The output, shaped like ``tgt``, in its dtype.
        """
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            return x + self._ff_block(self.norm3(x), self.dropout3)
        x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
        x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
        out: torch.Tensor = self.norm3(x + self._ff_block(x, self.dropout3))
        return out
