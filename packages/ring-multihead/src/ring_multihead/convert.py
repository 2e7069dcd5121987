"""Multihead weights of fkodom's ``dilated-attention-pytorch`` and of the original package, for our modules.

Both keep separate ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` linear layers
(``(E, E)`` weights, optional biases); :class:`~ring_multihead.MultiheadDilatedAttention`
keeps ``nn.MultiheadAttention``'s layout (one ``in_proj_weight`` of ``(3E, E)`` and one
``in_proj_bias``), so the conversion stacks the three projections. fkodom's sub-LayerNorm
``norm`` is ours (``layer_norm=True``). The original package's ``layer_norm=True`` instead
normalises the projected queries and keys before attention (``q_ln``, ``k_ln``) and applies
``q_ln`` again to the attention output; there is no such place in our module, so those
weights are refused rather than silently dropped.

The conversion moves weights only; the attention between the projections differs (see the
migration guide). With the original package the outputs coincide for one branch of rate 1
(segment-local or dense attention), not for several branches (offset ``i mod r_i``, division
by the number of branches); fkodom's attention also renormalises each branch's output by its
sum over the positions, which no configuration here reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["convert_state_dict"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """fkodom's or the original package's ``MultiheadDilatedAttention`` weights as ours.

    Args:
        state_dict: a module's ``state_dict()``, or a whole model's (then give ``prefix``).
        prefix: where the attention module sits in ``state_dict`` (e.g. ``"layers.0.self_attn."``);
            keys outside it are returned unchanged.

    Returns:
        A new state dict: under ``prefix``, ``in_proj_weight``, ``in_proj_bias`` (when the
        source has biases), ``out_proj.weight``, ``out_proj.bias`` and ``norm.weight``,
        ``norm.bias`` (fkodom's ``layer_norm=True``), loadable by
        ``MultiheadDilatedAttention(E, H, bias=..., layer_norm=..., batch_first=True, ...)``.

    Raises:
        ValueError: a projection is missing or not ``(E, E)``, biases are present for some
            projections only, the source has the original package's pre-attention ``q_ln`` /
            ``k_ln`` norms (no equivalent here), or a key under ``prefix`` is not understood.
    """
    inner = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
    converted = {key: value for key, value in state_dict.items() if not key.startswith(prefix)}
    if any(key.startswith(("q_ln.", "k_ln.")) for key in inner):
        raise ValueError(
            f"state_dict has {prefix}q_ln / {prefix}k_ln: the original package's layer_norm=True normalises the "
            "projected queries and keys before attention (and reuses q_ln after it); MultiheadDilatedAttention has "
            "only the sub-LayerNorm after attention (layer_norm=True), so these weights have no equivalent. "
            "Convert a model trained with layer_norm=False, or keep those norms outside the attention module."
        )
    missing = [f"{prefix}{name}.weight" for name in (*PROJECTIONS, "out_proj") if f"{name}.weight" not in inner]
    if missing:
        raise ValueError(f"state_dict lacks {missing}: not a multihead dilated attention module under {prefix!r}")
    weights = [inner.pop(f"{name}.weight") for name in PROJECTIONS]
    embed_dim = weights[0].shape[0]
    for name, weight in zip(PROJECTIONS, weights):
        if tuple(weight.shape) != (embed_dim, embed_dim):
            raise ValueError(
                f"{prefix}{name}.weight has shape {tuple(weight.shape)}; expected ({embed_dim}, {embed_dim})"
            )
    biases = [inner.pop(f"{name}.bias", None) for name in PROJECTIONS]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise ValueError(f"state_dict has biases for some of {PROJECTIONS} under {prefix!r} only")
    converted[f"{prefix}in_proj_weight"] = torch.cat(weights, dim=0)
    if biases[0] is not None:
        converted[f"{prefix}in_proj_bias"] = torch.cat([b for b in biases if b is not None], dim=0)
    for name in ("out_proj.weight", "out_proj.bias", "norm.weight", "norm.bias"):
        if name in inner:
            converted[f"{prefix}{name}"] = inner.pop(name)
    if inner:
        raise ValueError(f"state_dict has keys with no equivalent in MultiheadDilatedAttention: {sorted(inner)}")
    return converted
