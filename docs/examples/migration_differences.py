"""What changes for users of the original package, of fkodom's dilated-attention-pytorch and of torchscale.

Run it: ``python docs/examples/migration_differences.py``. The two functions below write the
peers' dilated attention formulas in plain torch (from their public code), so the differences
to ``merge="head_groups"`` and to the default ``merge="lse"`` can be measured here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ring_core import create_attention, create_multihead_attention
from ring_multihead import convert_state_dict


def head_groups(num_heads: int, branches: int) -> list[range]:
    """Contiguous groups of heads, one per branch, the larger groups first (as all three do)."""
    sizes = [num_heads // branches + (i < num_heads % branches) for i in range(branches)]
    starts = [sum(sizes[:i]) for i in range(branches)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]


def peer_dilated(q, k, v, segment_lengths, dilation_rates, is_causal=False, renormalise=False):
    """The original package's formula (``renormalise=True``: fkodom's). ``(B, N, H, D)``; N % w == 0 for every w.

    Branch ``i`` runs on head group ``i`` only, with offset ``i % r`` (the branch index, not the
    head), and the sum of the branches is divided by their number; fkodom first divides each
    branch's output by its sum over all positions.
    """
    b, n, h, d = q.shape
    outputs = []  # per head group, in head order
    groups = head_groups(h, len(segment_lengths))
    for i, (w, r, heads) in enumerate(zip(segment_lengths, dilation_rates, groups)):
        offset, g = i % r, len(heads)
        segmented = [x[:, :, heads.start : heads.stop].reshape(b, n // w, w, g, d) for x in (q, k, v)]
        qs, ks, vs = (x[:, :, offset::r].flatten(0, 1).transpose(1, 2) for x in segmented)  # (B*N/w, g, w/r, D)
        x = F.scaled_dot_product_attention(qs, ks, vs, is_causal=is_causal).transpose(1, 2)
        x = x.reshape(b, n // w, -1, g, d)
        if renormalise:
            x = x / x.sum(dim=(1, 2), keepdim=True)
        out = torch.zeros(b, n // w, w, g, d, dtype=q.dtype, device=q.device)
        out[:, :, offset::r] = x  # positions outside the branch's offset get 0
        outputs.append(out.reshape(b, n, g, d))
    out = torch.cat(outputs, dim=2)
    return out / len(segment_lengths)


def main() -> None:
    torch.manual_seed(0)
    b, n, h, d = 1, 64, 4, 16
    segments, rates = [16, 32], [1, 2]
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))

    ours = create_attention("dilated", segment_lengths=segments, dilation_rates=rates, merge="head_groups")(q, k, v)
    original = peer_dilated(q, k, v, segments, rates)
    fkodom = peer_dilated(q, k, v, segments, rates, renormalise=True)
    print(f"merge='head_groups' vs the original package: max |difference| {(ours - original).abs().max():.3f}")
    print(f"merge='head_groups' vs fkodom:               max |difference| {(ours - fkodom).abs().max():.3f}")
    one = create_attention("dilated", segment_lengths=[16], dilation_rates=[1])(q, k, v)
    print(
        f"one branch of rate 1 vs the original package: max |difference| {(one - peer_dilated(q, k, v, [16], [1])).abs().max():.1e}"
    )

    r = 2
    print(f"offset of heads 0..{h - 1} for r={r}: ours h % r = {[i % r for i in range(h)]}, "
          f"torchscale h // (H / r) = {[i // (h // r) for i in range(h)]}, original and fkodom (branch i) = i % r")  # fmt: skip

    # MultiheadDilatedAttention is nn.MultiheadAttention: (N, B, E) unless batch_first=True.
    e = h * d
    x = torch.randn(2, n, e, dtype=torch.float64)  # batch-first, as fkodom's and the original's modules take it
    mha = create_multihead_attention("multihead_dilated", embed_dim=e, num_heads=h, dtype=torch.float64,
                                     segment_lengths=[16], dilation_rates=[1])  # fmt: skip
    wrong, _ = mha(x, x, x)  # read as (N=2, B=64, E): attention across the wrong axis, no error
    mha.batch_first = True
    right, weights = mha(x, x, x, need_weights=False)
    print(f"batch-first input with batch_first=False: max |difference| {(wrong - right).abs().max():.3f} (no error)")
    print(f"need_weights=False returns weights {weights}; the default (True) computes them densely")

    # The original package's weights (layer_norm=False) load after conversion and give the same numbers.
    weights = {
        f"{p}.weight": torch.randn(e, e, dtype=torch.float64) / e**0.5
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    weights |= {f"{p}.bias": torch.randn(e, dtype=torch.float64) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    mha.load_state_dict(convert_state_dict(weights))
    project = {p: (weights[f"{p}.weight"], weights[f"{p}.bias"]) for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    qh, kh, vh = (F.linear(x, *project[p]).view(2, n, h, d) for p in ("q_proj", "k_proj", "v_proj"))
    theirs = F.linear(peer_dilated(qh, kh, vh, [16], [1]).flatten(2), *project["out_proj"])
    print(
        f"converted weights, one branch of rate 1: max |difference| {(mha(x, x, x, need_weights=False)[0] - theirs).abs().max():.1e}"
    )


if __name__ == "__main__":
    main()
