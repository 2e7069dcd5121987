"""``MultiheadDilatedAttention``: a drop-in for ``torch.nn.MultiheadAttention`` on dilated attention.

Same constructor arguments, parameter names and shapes (an ``nn.MultiheadAttention``
state_dict loads), same forward signature and return value. The attention itself
is ``ring_core.dilated_attention`` (SPEC.md), with two paths:

- the **fast path** (``need_weights=False``, no mask other than key padding and
  causal): the blockwise engine, O(N) memory, any length;
- the **dense path** (``need_weights=True``, a general ``attn_mask``, or a float
  ``key_padding_mask`` with values other than ``0`` / ``-inf``): the effective
  attention probabilities of SPEC.md are materialised, so it is limited to
  ``L * S <= max_dense_scores`` (query length times key length, default ``2**24``,
  e.g. 4096 x 4096); past it, a clear error says how to use the fast path.

Both paths give the same numbers (float64: to rounding); SPEC.md's "a query that
sees no key outputs 0" replaces ``nn.MultiheadAttention``'s NaN for fully masked rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ring_core.plugin import (
    NO_WINDOW,
    branch_counts,
    branches,
    check_cu_seqlens,
    check_dilated_config,
    check_dropout,
    check_window,
    default_scale,
    document_mask,
    window_allowed,
)

from .core import sequence_attention


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _binary_to_bool(mask: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """``(mask, True)`` as bool (True = masked) when it is bool or holds only ``0`` / ``-inf``; else ``(mask, False)``."""
    if mask.dtype == torch.bool:
        return mask, True
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating-point tensor, got {_dtype_name(mask.dtype)}")
    if not mask.requires_grad and bool(((mask == 0) | (mask == float("-inf"))).all()):  # else it gets a gradient
        return mask == float("-inf"), True
    return mask, False


class MultiheadDilatedAttention(nn.Module):
    """A drop-in for ``torch.nn.MultiheadAttention`` computing LongNet dilated attention.

    Arguments ``embed_dim`` to ``dtype`` are ``nn.MultiheadAttention``'s, in its
    order, with its parameter names and shapes. The keyword-only extras:

    - ``segment_lengths``, ``dilation_rates``, ``merge``: the dilated configuration
      (SPEC.md). ``None`` (the default) is dense attention: one segment spanning
      the sequence, rate 1, i.e. exactly ``nn.MultiheadAttention``.
    - ``window_size``: a sliding window ``(left, right)`` (SPEC.md; ``-1`` unbounded), for
      self-attention (query and key of the same length).
    - ``layer_norm``: MAGNETO's sub-LayerNorm (``self.norm``, before ``out_proj``).
    - ``layer_norm_eps``: the ``eps`` of that LayerNorm.
    - ``gamma_init``: MAGNETO's ``gamma`` (see :mod:`ring_multihead.magneto`).
      Initialisation: ``q``, ``k`` projections ``xavier_normal_(gain=1)``; ``v``
      and ``out_proj`` ``xavier_normal_(gain=gamma_init)``; biases zero.
    """

    # torch's TransformerEncoder(Layer) take their fused inference paths (eval, no grad: dense attention on
    # in_proj_weight through merge_masks, nested tensors for padding) only when this is True; they would compute
    # plain attention (no dilation, no sub-LayerNorm), never calling this module. False keeps them on forward.
    # An encoder decides on nested tensors in its constructor: one built around nn.MultiheadAttention and given
    # this module afterwards passes them, which _check_inputs refuses with what to do.
    _qkv_same_embed_dim: ClassVar[bool] = False
    max_dense_scores: ClassVar[int] = 1 << 24

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
        window_size: tuple[int, int] = NO_WINDOW,
    ) -> None:
        window_size = check_window(window_size)
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0):
                raise ValueError(f"{name} must be None or a positive int, got {dim!r}")
        if not (isinstance(gamma_init, (int, float)) and not isinstance(gamma_init, bool) and gamma_init > 0):
            raise ValueError(f"gamma_init must be a positive float, got {gamma_init!r}")
        if segment_lengths is None:
            if dilation_rates is not None:
                raise ValueError(
                    f"dilation_rates={dilation_rates!r} needs segment_lengths (None means dense attention)"
                )
            self.segment_lengths, self.dilation_rates = None, None
            check_dilated_config([1], [1], merge)
        else:
            rates = [1] * len(segment_lengths) if dilation_rates is None else dilation_rates
            self.segment_lengths, self.dilation_rates = check_dilated_config(segment_lengths, rates, merge)
            branches(self.segment_lengths, self.dilation_rates, merge, num_heads)  # head_groups: a head per branch
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._packed_in_proj = self.kdim == embed_dim and self.vdim == embed_dim  # one in_proj_weight, as in torch
        self.num_heads = num_heads
        self.dropout = check_dropout(dropout)
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.merge = merge
        self.window_size = window_size
        self.gamma_init = float(gamma_init)
        if self._packed_in_proj:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k: nn.Parameter | None = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v: nn.Parameter | None = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """MAGNETO: q, k ``xavier_normal_(gain=1)``; v, out ``xavier_normal_(gain=gamma_init)``; biases 0."""
        e = self.embed_dim
        with torch.no_grad():
            if self._packed_in_proj:
                weights = self.in_proj_weight[:e], self.in_proj_weight[e : 2 * e], self.in_proj_weight[2 * e :]
            else:
                weights = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            nn.init.xavier_normal_(weights[0])
            nn.init.xavier_normal_(weights[1])
            nn.init.xavier_normal_(weights[2], gain=self.gamma_init)
            nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
            if self.in_proj_bias is not None:
                nn.init.zeros_(self.in_proj_bias)
            if self.out_proj.bias is not None:
                nn.init.zeros_(self.out_proj.bias)
            if self.bias_k is not None and self.bias_v is not None:
                nn.init.xavier_normal_(self.bias_k)
                nn.init.xavier_normal_(self.bias_v)

    # -- hooks the ring variant overrides ------------------------------------------
    def _global_keys(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
        """For the dense path: every key of the sequence, its mask, the queries' global positions and ``N``."""
        return k, v, key_padding_mask, torch.arange(q.shape[1], device=q.device), k.shape[1]

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
        """The fast path on ``(B, N, H, D)`` tensors (:mod:`ring_multihead.core`: one op for ``torch.compile``)."""
        return sequence_attention(
            q, k, v, extra, segment_lengths=self.segment_lengths, dilation_rates=self.dilation_rates,
            merge=self.merge, is_causal=is_causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
            window_size=self.window_size, cu_seqlens=cu_seqlens,
        )  # fmt: skip

    # -- forward -----------------------------------------------------------------------
    def _config(self, seq_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self.segment_lengths is None or self.dilation_rates is None:
            return (max(seq_len, 1),), (1,)
        return self.segment_lengths, self.dilation_rates

    def _check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Shapes and dtypes as ``nn.MultiheadAttention`` accepts them; returns whether batched."""
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.is_nested:  # nn.TransformerEncoder's fast path, chosen when it was built around nn.MultiheadAttention
                raise TypeError(
                    f"{name} is a nested tensor, which {type(self).__name__} does not take: nn.TransformerEncoder "
                    "passes them when it was built around nn.MultiheadAttention (it decides in its constructor); "
                    "swap this module in before building the encoder, or build it with enable_nested_tensor=False"
                )
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must have the same number of dims, got shapes {tuple(query.shape)}, "
                f"{tuple(key.shape)}, {tuple(value.shape)}"
            )
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if x.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim} features in its last dim, got shape {tuple(x.shape)}")
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {_dtype_name(x.dtype)}")
        if not query.dtype == key.dtype == value.dtype:
            raise TypeError(
                f"query, key, value must share one dtype, got {_dtype_name(query.dtype)}, "
                f"{_dtype_name(key.dtype)}, {_dtype_name(value.dtype)}"
            )
        batched = query.dim() == 3
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(
                f"key and value must match but in the last dim, got {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if batched:
            batch_dim = 0 if self.batch_first else 1
            if query.shape[batch_dim] != key.shape[batch_dim]:
                raise ValueError(
                    f"query and key must share the batch size (dim {batch_dim}, batch_first={self.batch_first}), "
                    f"got shapes {tuple(query.shape)} and {tuple(key.shape)}"
                )
        return batched

    def _global_length(self, length: int) -> int:
        """The sequence length ``N`` of this rank's ``length`` positions (the ring variant multiplies by ``P``)."""
        return length

    def _check_positions(self, b: int, q_len: int, k_len: int, cu_seqlens: torch.Tensor | None) -> None:
        """Windows and packed documents need self-attention; ``cu_seqlens`` is checked against ``N``."""
        if (self.window_size != NO_WINDOW or cu_seqlens is not None) and q_len != k_len:
            what = "window_size" if cu_seqlens is None else "cu_seqlens"
            raise ValueError(
                f"{what} needs self-attention (query and key of the same length), got lengths {q_len} and {k_len}"
            )
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, self._global_length(q_len), b)

    def _key_padding_mask(self, mask: torch.Tensor | None, b: int, s: int, batched: bool) -> torch.Tensor | None:
        """Bool ``(B, S)`` (True = padding) or, for other float values, the additive float mask."""
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
        expected = (b, s) if batched else (s,)
        if tuple(mask.shape) != expected:
            raise ValueError(
                f"key_padding_mask must have shape {expected} (batch, key length), got {tuple(mask.shape)}"
            )
        if not torch.compiler.is_compiling():
            mask, _ = _binary_to_bool(mask, "key_padding_mask")
        elif not (mask.dtype == torch.bool or mask.is_floating_point()):
            raise TypeError(f"key_padding_mask must be a bool or floating-point tensor, got {_dtype_name(mask.dtype)}")
        # (compiled, values cannot choose the path: a float mask takes the fast path, whose op checks
        # when it runs that the mask holds only 0 and -inf, nn.Transformer's form of a bool mask)
        return mask if batched else mask.unsqueeze(0)

    def _attn_mask(
        self,
        mask: torch.Tensor | None,
        b: int,
        q_len: int,
        k_len: int,
        batched: bool,
        is_causal: bool,
        trust_hint: bool = False,
    ) -> tuple[bool, torch.Tensor | None]:
        """``(causal, general)``: a causal mask becomes the causal flag; anything else a ``(B|1, H|1, L, S)`` mask.

        ``trust_hint`` (``is_causal=True`` with neither padding nor weights): like
        ``nn.MultiheadAttention``, the mask is taken to be the causal one and never read, so no
        ``L x S`` pass over it per call; whatever it holds, the result is causal attention.
        """
        if mask is None or trust_hint:
            if is_causal and q_len != k_len:
                raise ValueError(f"is_causal=True needs query and key of the same length, got {q_len} and {k_len}")
        if mask is None:
            return is_causal, None
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(mask).__name__}")
        heads = self.num_heads * b if batched else self.num_heads
        if tuple(mask.shape) not in ((q_len, k_len), (heads, q_len, k_len)):
            raise ValueError(
                f"attn_mask must have shape (L, S) = {(q_len, k_len)} or (batch*num_heads, L, S) = {(heads, q_len, k_len)}, "
                f"got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"attn_mask must be a bool or floating-point tensor, got {_dtype_name(mask.dtype)}")
        if trust_hint:
            return True, None
        # not hinted (or nn.MultiheadAttention would apply the mask as given): a causal mask is still
        # recognised, so it takes the O(N) causal path rather than the dense one
        binary = False  # compiled, values cannot choose the path: the mask applies as given (dense path)
        if not torch.compiler.is_compiling():
            mask, binary = _binary_to_bool(mask, "attn_mask")
        if binary and q_len == k_len:
            causal_pattern = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).triu(1)
            if bool((mask == causal_pattern).all()):
                return True, None
        if mask.dim() == 3:
            mask = mask.view(mask.shape[0] // self.num_heads, self.num_heads, q_len, k_len)
        return False, mask

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, self_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.embed_dim
        heads = (self.num_heads, self.head_dim)
        if self_attention and self._packed_in_proj:  # one product for q, k and v, as nn.MultiheadAttention
            packed = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            q, k, v = packed.unflatten(-1, (3, *heads)).unbind(-3)
            return q, k, v
        if self._packed_in_proj:
            wq, wk, wv = self.in_proj_weight[:e], self.in_proj_weight[e : 2 * e], self.in_proj_weight[2 * e :]
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq = bk = bv = None
        if self.in_proj_bias is not None:
            bq, bk, bv = self.in_proj_bias[:e], self.in_proj_bias[e : 2 * e], self.in_proj_bias[2 * e :]
        return (
            F.linear(query, wq, bq).unflatten(-1, heads),
            F.linear(key, wk, bk).unflatten(-1, heads),
            F.linear(value, wv, bv).unflatten(-1, heads),
        )

    def _extra_keys(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(B, e, H, D)`` keys and values appended by ``add_bias_kv`` then ``add_zero_attn``, or None."""
        b = k.shape[0]
        keys, values = [], []
        if self.bias_k is not None and self.bias_v is not None:
            keys.append(self.bias_k.expand(b, 1, -1).unflatten(-1, (self.num_heads, self.head_dim)))
            values.append(self.bias_v.expand(b, 1, -1).unflatten(-1, (self.num_heads, self.head_dim)))
        if self.add_zero_attn:
            zeros = k.new_zeros(b, 1, self.num_heads, self.head_dim)
            keys.append(zeros)
            values.append(zeros)
        if not keys:
            return None
        return torch.cat(keys, 1).to(k.dtype), torch.cat(values, 1).to(k.dtype)

    def _dense_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        extra: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        is_causal: bool,
        key_padding_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SPEC.md's attention with explicit probabilities ``(B, H, L, S + extra)``; differentiable."""
        if self.segment_lengths is not None and q.shape[1] != k.shape[1]:
            raise ValueError(
                f"dilated attention (segment_lengths={list(self.segment_lengths)}) needs query and key of the same "
                f"length, got {q.shape[1]} and {k.shape[1]}; segment_lengths=None is dense attention for any lengths"
            )
        k, v, key_padding_mask, q_pos, n = self._global_keys(q, k, v, key_padding_mask)
        q_len, k_len = q.shape[1], k.shape[1]
        scores = q_len * (k_len + (0 if extra is None else extra[0].shape[1]))
        if scores > self.max_dense_scores:
            raise ValueError(
                f"need_weights=True, a general attn_mask or a float key_padding_mask materialise the attention "
                f"probabilities, limited to query length x key length <= max_dense_scores = {self.max_dense_scores}; "
                f"got {q_len} x {scores // q_len} = {scores}. Pass need_weights=False and at most a bool/causal mask "
                f"(is_causal=True) for the O(N) path, or raise {type(self).__name__}.max_dense_scores"
            )
        if self.segment_lengths is None or self.dilation_rates is None:
            counts = torch.ones(1, q_len, k_len, dtype=q.dtype, device=q.device)
            if cu_seqlens is not None:
                counts = counts * document_mask(n, cu_seqlens, q.device)[q_pos].to(q.dtype)
        else:
            counts = branch_counts(
                n, self.num_heads, self.segment_lengths, self.dilation_rates, self.merge, q.device,
                cu_seqlens=cu_seqlens,
            )  # fmt: skip
            counts = counts[:, q_pos].to(q.dtype)
        if self.window_size != NO_WINDOW:
            counts = counts * window_allowed(n, self.window_size, q.device)[q_pos].to(q.dtype)
        if is_causal:
            counts = counts * (torch.arange(k_len, device=q.device)[None, :] <= q_pos[:, None]).to(q.dtype)
        logits = torch.einsum("blhd,bshd->bhls", q, k) * default_scale(self.head_dim, None) + torch.log(counts)
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            else:
                logits = logits + key_padding_mask[:, None, None, :].to(logits.dtype)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask.to(logits.dtype)
        if extra is not None:
            extra_logits = torch.einsum("blhd,bshd->bhls", q, extra[0]) * default_scale(self.head_dim, None)
            logits = torch.cat([logits, extra_logits], -1)
            v = torch.cat([v, extra[1]], 1)
        if logits.shape[-1] == 0:  # no key: amax has nothing to reduce; the output is 0 and the weights empty
            row_max = logits.new_zeros((*logits.shape[:-1], 1))
        else:
            row_max = logits.detach().amax(-1, keepdim=True)
            row_max = row_max.masked_fill(torch.isinf(row_max), 0.0)
        weights = torch.exp(logits - row_max)
        denominator = weights.sum(-1, keepdim=True)
        probs = weights / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        if dropout_p > 0:
            probs = F.dropout(probs, dropout_p)
        return torch.einsum("bhls,bshd->blhd", probs, v), probs

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
        """``nn.MultiheadAttention.forward``: returns ``(attn_output, attn_weights or None)``.

        ``is_causal=True`` alone (``attn_mask=None``) is causal attention; a causal
        ``attn_mask`` (bool ``True`` or float ``-inf`` exactly above the diagonal)
        takes the same fast causal path. ``is_causal=True`` with an ``attn_mask`` is, as in
        ``nn.MultiheadAttention``, a hint that the mask is causal: without ``key_padding_mask``
        and with ``need_weights=False`` the mask is not read (causal attention, whatever it
        holds); otherwise the mask applies as given. (No ``return_lse``: ``out_proj`` mixes the
        heads, so a per-head log-sum-exp cannot merge two calls' outputs.)

        Args:
            query: ``(L, B, E)``, or ``(B, L, E)`` with ``batch_first=True``, or unbatched
                ``(L, E)``; the module's dtype (float64, float32, float16 or bfloat16).
            key: ``(S, B, kdim)`` (batch-first or unbatched likewise).
            value: ``(S, B, vdim)``.
            key_padding_mask: ``(B, S)``, bool (``True``: padding, ignored) or float (added to
                the scores).
            need_weights: also return the attention weights; they are materialised densely
                (``L * S`` at most ``max_dense_scores``), so pass ``False`` for long sequences.
            attn_mask: ``(L, S)`` or ``(B * H, L, S)``, bool (``True``: not allowed) or float
                (added); a causal mask takes the fast path.
            average_attn_weights: average the returned weights over the heads.
            is_causal: causal attention (see above).
            cu_seqlens: 1-D integer tensor ``[0, ..., L]`` of document boundaries of a packed batch
                of one (self-attention; SPEC.md "Packed sequences").

        Returns:
            ``attn_output`` shaped like ``query`` but with ``E`` features, and ``attn_weights``:
            the effective probabilities, ``(B, L, S)`` averaged or ``(B, H, L, S)``, ``S``
            counting ``add_bias_kv`` / ``add_zero_attn`` keys; ``None`` when
            ``need_weights=False``.
        """
        batched = self._check_inputs(query, key, value)
        self_attention = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
        self._check_positions(b, q_len, k_len, cu_seqlens)
        key_padding_mask = self._key_padding_mask(key_padding_mask, b, k_len, batched)
        # nn.MultiheadAttention trusts is_causal for an attn_mask only without padding and weights;
        # otherwise it applies the mask as given (and so do we)
        trust_hint = is_causal and attn_mask is not None and key_padding_mask is None and not need_weights
        causal, general_mask = self._attn_mask(attn_mask, b, q_len, k_len, batched, is_causal, trust_hint)
        q, k, v = self._project(query, key, value, self_attention)
        extra = self._extra_keys(k)
        dropout_p = self.dropout if self.training else 0.0
        float_padding = key_padding_mask is not None and key_padding_mask.dtype != torch.bool
        float_padding = float_padding and not torch.compiler.is_compiling()  # (see _key_padding_mask)
        weights = None
        dilated_cross = q_len != k_len and self.segment_lengths is not None  # refused there, clearly
        if need_weights or general_mask is not None or float_padding or dilated_cross:
            out, weights = self._dense_attention(
                q,
                k,
                v,
                extra,
                is_causal=causal,
                key_padding_mask=key_padding_mask,
                attn_mask=general_mask,
                dropout_p=dropout_p,
                cu_seqlens=cu_seqlens,
            )
        else:
            out = self._sequence_attention(
                q, k, v, extra, is_causal=causal, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                cu_seqlens=cu_seqlens,
            )  # fmt: skip
        out = out.flatten(2)
        if self.norm is not None:
            out = self.norm(out)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights if need_weights else None

    def extra_repr(self) -> str:
        config = (
            "dense"
            if self.segment_lengths is None or self.dilation_rates is None
            else f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}"
        )
        window = f", window_size={self.window_size}" if self.window_size != NO_WINDOW else ""
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, {config}, merge={self.merge!r}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}, layer_norm={self.norm is not None}{window}"
        )
