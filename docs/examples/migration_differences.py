"""What changes for users of the original package, fkodom and torchscale.

Run: ``python docs/examples/migration_differences.py``. ``peer_dilated``
writes the peers' dilated attention formulas in plain torch (from their
public code), so their differences to ours can be measured here.
"""

import torch
import torch.nn.functional as F

from ring_core import create_attention, create_multihead_attention
from ring_multihead import convert_state_dict


def head_groups(num_heads: int, branches: int) -> list[range]:
    """One contiguous group of heads per branch, the larger groups first."""
    q, extra = divmod(num_heads, branches)
    sizes = [q + (i < extra) for i in range(branches)]
    return [
        range(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(branches)
    ]


def peer_dilated(q, k, v, segments, rates, is_causal=False, renormalise=False):
    """The original package's formula; ``renormalise=True``: fkodom's.

    ``(B, N, H, D)``, N a multiple of every segment. Branch ``i`` runs on
    head group ``i`` only, with offset ``i % r`` (the branch index, not the
    head), and the branches are averaged; fkodom also divides each branch's
    output by its sum over all positions.
    """
    b, n, h, d = q.shape
    outputs = []  # one per head group, in head order
    for i, (w, r, heads) in enumerate(
        zip(segments, rates, head_groups(h, len(segments)))
    ):
        offset, g = i % r, len(heads)
        picked = [
            x[:, :, heads.start : heads.stop]
            .reshape(b, n // w, w, g, d)[:, :, offset::r]
            .flatten(0, 1)
            .transpose(1, 2)  # (B * N / w, g, w / r, D)
            for x in (q, k, v)
        ]
        x = F.scaled_dot_product_attention(*picked, is_causal=is_causal)
        x = x.transpose(1, 2).reshape(b, n // w, -1, g, d)
        if renormalise:
            x = x / x.sum(dim=(1, 2), keepdim=True)
        out = q.new_zeros(b, n // w, w, g, d)
        out[:, :, offset::r] = x  # other positions of the segment: 0
        outputs.append(out.reshape(b, n, g, d))
    return torch.cat(outputs, dim=2) / len(segments)


def report(what: str, difference: torch.Tensor, note: str = "") -> None:
    print(f"{what}: max |difference| {difference.abs().max():.3g}{note}")


def main() -> None:
    torch.manual_seed(0)
    b, n, h, d = 1, 64, 4, 16
    segments, rates = [16, 32], [1, 2]
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))

    groups = create_attention(
        "dilated", segment_lengths=segments, dilation_rates=rates,
        merge="head_groups",
    )(q, k, v)  # fmt: skip
    original = peer_dilated(q, k, v, segments, rates)
    fkodom = peer_dilated(q, k, v, segments, rates, renormalise=True)
    report("head_groups vs the original package", groups - original)
    report("head_groups vs fkodom", groups - fkodom)
    one = create_attention("dilated", segment_lengths=[16], dilation_rates=[1])
    report("one branch of rate 1 vs the original", one(q, k, v)
           - peer_dilated(q, k, v, [16], [1]))  # fmt: skip

    ours = [i % 2 for i in range(h)]
    torchscale = [i // (h // 2) for i in range(h)]
    print(f"offsets of heads 0..{h - 1} at rate 2: ours (h % r) {ours}")
    print(f"  torchscale (h // (H / r)) {torchscale}; original, fkodom: i % r")

    # MultiheadDilatedAttention is nn.MultiheadAttention: (N, B, E) input
    # unless batch_first=True, and need_weights=True by default.
    e = h * d
    x = torch.randn(2, n, e, dtype=torch.float64)  # batch-first, like theirs
    mha = create_multihead_attention(
        "multihead_dilated", embed_dim=e, num_heads=h, dtype=torch.float64,
        segment_lengths=[16], dilation_rates=[1],
    )  # fmt: skip
    wrong, _ = mha(x, x, x)  # read as (N=2, B=64, E): no error
    mha.batch_first = True
    right, weights = mha(x, x, x, need_weights=False)
    report(
        "batch-first input, batch_first=False", wrong - right, " (no error)"
    )
    print(f"need_weights=False gives weights={weights} (default True: dense)")

    # The original package's weights (layer_norm=False), converted.
    names = ("q_proj", "k_proj", "v_proj", "out_proj")
    theirs = {
        f"{p}.weight": torch.randn(e, e).double() / e**0.5 for p in names
    }
    theirs |= {f"{p}.bias": torch.randn(e).double() for p in names}
    mha.load_state_dict(convert_state_dict(theirs))
    proj = {p: (theirs[f"{p}.weight"], theirs[f"{p}.bias"]) for p in names}
    qh, kh, vh = (F.linear(x, *proj[p]).view(2, n, h, d) for p in names[:3])
    expected = peer_dilated(qh, kh, vh, [16], [1]).flatten(2)
    expected = F.linear(expected, *proj["out_proj"])
    actual, _ = mha(x, x, x, need_weights=False)
    report("converted weights, one branch of rate 1", actual - expected)


if __name__ == "__main__":
    main()
