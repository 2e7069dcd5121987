"""Sequence parallelism for a transformers causal LM: shard a batch, sum the loss.

Every rank of the group holds the whole batch, takes its shard of the sequence
(:func:`shard_batch`) and runs the model on it with a sequence-parallel
implementation (``enable(model, "ring_dilated", process_group=group, layout=...)``).
Three things make the shards add up to the single-process step:

- ``position_ids`` are the **global** positions of the rank's tokens (RoPE and
  packed-document boundaries need them);
- the labels are shifted by one over the **whole** sequence before sharding
  (``shift_labels``: the target of the last token of a shard is the first token
  of the next shard, not lost), ``-100`` after the last token;
- each rank's loss is its **share** of the batch mean: the sum of its tokens'
  losses divided by the number of targets in the whole batch
  (``num_items_in_batch``). The shares sum to the mean loss, and the parameter
  gradients of the ranks sum to its gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ring_core import shard_positions, shard_sequence

from .packing import cu_seqlens_from_position_ids

IGNORE_INDEX = -100

# (B, N, ...) entries of a causal-LM batch, sharded along N.
SEQUENCE_KEYS = ("input_ids", "inputs_embeds", "position_ids", "attention_mask", "token_type_ids")
# flash-attn's varlen keywords of a packed batch: they describe the whole sequence, so every rank keeps them.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _rank_and_size(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_batch needs an initialised torch.distributed process group")
    return dist.get_rank(group), dist.get_world_size(group)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels[:, 1:]`` followed by ``ignore_index``: the target of every position (transformers' causal-LM shift)."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def shard_batch(
    batch: Mapping[str, Any],
    group: Any = None,
    layout: str = "contiguous",
    *,
    rank: int | None = None,
    world_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """This rank's shard of a causal-LM ``batch`` (``(B, N)`` tensors on every rank), ready for ``model(**shard)``.

    - ``input_ids`` (or ``inputs_embeds``), ``attention_mask``, ``token_type_ids``:
      this rank's positions (``layout`` ``"contiguous"`` or ``"zigzag"``, SPEC.md);
    - ``position_ids``: the global positions of those tokens (the batch's own
      ``position_ids`` when given, e.g. a packed batch, else ``0 .. N-1``);
    - ``cu_seq_lens_q`` / ``cu_seq_lens_k`` of a packed batch (``position_ids`` restarting at 0, one row): the
      documents of the whole sequence, flash-attn's varlen keywords, which transformers passes on to attention
      (so no rank gathers the positions, and documents that line up with the shards stay apart); a batch's own
      varlen keywords are kept as they are;
    - ``labels``: shifted over the whole sequence first (``shift_labels``), then sharded;
      returned as ``shift_labels`` (transformers' loss uses them as they are) and as
      ``labels`` (so the model computes its loss), with ``num_items_in_batch``, the
      number of targets (``!= ignore_index``) in the whole batch: the model's
      ``loss`` on each rank is then its share of the batch mean (see :func:`loss_share`).
      A batch with ``shift_labels`` already (packing collators) uses them.

    ``N`` must be a multiple of the group size (``2 P`` for zigzag). Other keys raise
    a ``ValueError`` (sharding them is not defined here). ``rank`` / ``world_size``
    override the group's (e.g. to prepare shards in one process).
    """
    if rank is None or world_size is None:
        group_rank, group_size = _rank_and_size(group)
        rank = group_rank if rank is None else rank
        world_size = group_size if world_size is None else world_size
    known = [*SEQUENCE_KEYS, *VARLEN_KEYS, "labels", "shift_labels"]
    unknown = sorted(set(batch) - set(known))
    if unknown:
        raise ValueError(f"shard_batch does not know how to shard {unknown}; known keys: {known}")
    tokens = batch.get("input_ids", batch.get("inputs_embeds"))
    if tokens is None:
        raise ValueError("shard_batch needs input_ids or inputs_embeds")
    n = tokens.shape[1]
    out: dict[str, Any] = {}
    for key in SEQUENCE_KEYS:
        if batch.get(key) is not None:
            out[key] = _shard(batch[key], key, n, layout, rank, world_size)
    if "position_ids" not in out:
        out["position_ids"] = shard_positions(n, rank, world_size, layout).to(tokens.device)[None]
    out.update({key: batch[key] for key in VARLEN_KEYS if batch.get(key) is not None})
    if "cu_seq_lens_q" not in out and batch.get("position_ids") is not None:
        cu_seqlens = cu_seqlens_from_position_ids(batch["position_ids"])
        if cu_seqlens is not None:
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seqlens
    targets = batch.get("shift_labels")
    if targets is None and batch.get("labels") is not None:
        targets = shift_labels(batch["labels"], ignore_index)
    if targets is not None:
        local = _shard(targets, "shift_labels", n, layout, rank, world_size)
        out["labels"] = out["shift_labels"] = local
        out["num_items_in_batch"] = (targets != ignore_index).sum()
    return out


def _shard(x: torch.Tensor, key: str, n: int, layout: str, rank: int, world_size: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"batch[{key!r}] must be a (B, N={n}, ...) tensor, got {shape}")
    return shard_sequence(x, layout, dim=1, rank=rank, world_size=world_size).contiguous()


def loss_share(logits: torch.Tensor, shard: Mapping[str, Any], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """This rank's share of the batch's mean cross-entropy, in the dtype of ``logits``.

    ``sum(token losses of this shard) / num_items_in_batch``, with ``shard`` from
    :func:`shard_batch`. The shares of the ranks sum to the mean over the whole batch
    (:func:`sum_over_ranks`), and so do the gradients: backpropagate each rank's share
    and **sum** the parameter gradients over the group (DDP and FSDP average them
    instead, so backpropagate ``share * world_size`` there, or set FSDP2's
    ``set_gradient_divide_factor(1.0)``). ``model(**shard).loss`` is the same share
    computed by transformers (in float32).
    """
    targets = shard["shift_labels"]
    total = F.cross_entropy(
        logits.flatten(0, -2), targets.flatten().to(logits.device), ignore_index=ignore_index, reduction="sum"
    )
    share: torch.Tensor = total / shard["num_items_in_batch"]
    return share


def sum_over_ranks(value: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The sum of ``value`` over the ranks of ``group`` (detached; e.g. the batch loss from every rank's share)."""
    total = value.detach().clone()
    dist.all_reduce(total, group=group)
    return total
