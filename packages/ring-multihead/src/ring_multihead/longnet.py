"""``LongNetLM``: a decoder-only LongNet language model (Ding et al., 2023) with MAGNETO (Wang et al., 2022).

Token embedding plus learned absolute positions, ``num_layers`` pre-LN
:class:`~ring_multihead.DilatedTransformerEncoderLayer` blocks run causally
(dilated attention with MAGNETO's sub-LayerNorm in the attention and the
feed-forward network, ``gamma = sqrt(log(2 * num_layers))`` in the init), a final
LayerNorm and an output head tied to the embedding.

With ``process_group`` every rank passes its shard of each sequence (``layout``
``"contiguous"`` or ``"zigzag"``) and gets the logits of its tokens; the attention
is the ring (:class:`~ring_multihead.RingMultiheadDilatedAttention`). Parameter
gradients are this rank's contribution: sum them over the group (with FSDP2,
``set_gradient_divide_factor(1.0)``; DDP averages, so scale the loss by the group
size there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ring_core import shard_positions

from .layers import DilatedTransformerEncoderLayer
from .magneto import magneto_gamma


class LongNetLM(nn.Module):
    """Decoder-only LongNet: ``forward(tokens, positions=None, key_padding_mask=None) -> logits``.

    ``tokens`` ``(B, n)``: the whole sequences, or this rank's shards with a
    ``process_group``. ``positions`` (``(n,)`` or ``(B, n)``, global) default to
    ``0 .. n-1``, or to this rank's global positions in ``layout``. Logits
    ``(B, n, vocab_size)``. ``max_seq_len`` bounds the (global) positions.
    ``activation_checkpointing`` recomputes each layer in the backward pass
    (``torch.utils.checkpoint``) instead of keeping its activations.
    """

    def __init__(
        self,
        vocab_size: int,
        max_seq_len: int,
        d_model: int = 512,
        num_heads: int = 8,
        num_layers: int = 6,
        *,
        segment_lengths: Sequence[int] | None = None,
        dilation_rates: Sequence[int] | None = None,
        merge: str = "lse",
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        activation: str = "gelu",
        layer_norm_eps: float = 1e-5,
        process_group: Any = None,
        layout: str = "contiguous",
        activation_checkpointing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.max_seq_len = max_seq_len
        self.process_group = process_group
        self.layout = layout
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(vocab_size, d_model, **factory)
        self.positions = nn.Embedding(max_seq_len, d_model, **factory)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        nn.init.normal_(self.positions.weight, std=0.02)
        layer_options = {
            "batch_first": True, "norm_first": True, **factory, "segment_lengths": segment_lengths,
            "dilation_rates": dilation_rates, "merge": merge, "sub_layer_norm": True,
            "gamma_init": magneto_gamma(num_layers), "process_group": process_group, "layout": layout,
        }  # fmt: skip
        self.layers = nn.ModuleList(
            DilatedTransformerEncoderLayer(
                d_model, num_heads, dim_feedforward or 4 * d_model, dropout, activation, layer_norm_eps, **layer_options
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model, eps=layer_norm_eps, **factory)

    def default_positions(self, local_len: int, device: torch.device) -> torch.Tensor:
        """``0 .. n-1`` on one process, else this rank's global positions of a sequence of ``P * n``."""
        if self.process_group is None:
            return torch.arange(local_len, device=device)
        import torch.distributed as dist

        rank, world = dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return shard_positions(local_len * world, rank, world, self.layout).to(device)

    def check_positions(self, positions: torch.Tensor) -> None:
        """Positions in ``[0, max_seq_len)``: a ``ValueError`` with the values, or under ``torch.compile`` a
        ``RuntimeError`` from inside the graph (a Python branch on the values would break the graph)."""
        if torch.compiler.is_compiling():
            valid = ((positions >= 0) & (positions < self.max_seq_len)).all()
            torch._assert_async(valid, f"positions must be in [0, max_seq_len={self.max_seq_len})")
        elif positions.numel():
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or high >= self.max_seq_len:
                raise ValueError(
                    f"positions must be in [0, max_seq_len={self.max_seq_len}), got values from {low} to {high}"
                )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token logits of a causal LongNet over ``tokens``.

        Args:
            tokens: ``(B, n)`` integer token ids (this rank's shard with a ``process_group``).
            positions: the tokens' positions, ``(n,)`` or ``(B, n)``, each ``< max_seq_len``
                (default: ``0 .. n-1``, or this rank's global positions in ``layout``).
            key_padding_mask: ``(B, n)`` bool, ``True`` where a token is padding.

        Returns:
            ``(B, n, vocab_size)`` logits in the model's dtype (float32 unless ``dtype`` says otherwise).
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (B, n), got {tuple(tokens.shape)}")
        if positions is None:
            positions = self.default_positions(tokens.shape[1], tokens.device)
        if positions.shape[-1] != tokens.shape[1]:
            raise ValueError(f"positions must have {tokens.shape[1]} entries per row, got {tuple(positions.shape)}")
        self.check_positions(positions)
        x = self.embed(tokens) + self.positions(positions)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, src_key_padding_mask=key_padding_mask, is_causal=True, use_reentrant=False)
            else:
                x = layer(x, src_key_padding_mask=key_padding_mask, is_causal=True)
        logits: torch.Tensor = self.norm(x) @ self.embed.weight.T
        return logits
