"""The documentation's concept figures, computed from the code (never hand-drawn).

    python docs/_hooks/figures.py --out docs-figures/     # write the PNGs

The docs build (``docs/_hooks/hooks.py``) calls :func:`render_all` and serves the
PNGs under ``figures/``, so the figures always match the installed code:

- ``dilated-pattern.png``: ``ring_core.branch_counts`` of a configuration, per head;
- ``ring-schedule.png``: which K/V shard each rank holds at each ring step, and
  which (query shard, key shard) blocks causal attention skips;
- ``ring-dilated-sends.png``: the key rows a rank needs from the others for a
  dilated configuration (everything else never travels);
- ``zigzag-balance.png``: causal work per rank and per ring step, contiguous vs zigzag;
- ``lse-merge.png``: blocks merged by ``ring_core.merge_into`` equal one softmax.
"""

from __future__ import annotations

import argparse
import io
import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

import ring_core
from ring_core.kernels import MathKernel, merge_into

RANK_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c"]


def shard_positions(seq_len: int, rank: int, world_size: int, layout: str) -> list[int]:
    """Global positions of a rank's shard (ring_core.sharding when present, else SPEC.md's definition)."""
    try:
        from ring_core.sharding import shard_positions as positions

        return positions(seq_len, rank, world_size, layout).tolist()
    except ImportError:  # SPEC.md "Sequence parallelism"
        if layout == "contiguous":
            size = seq_len // world_size
            return list(range(rank * size, (rank + 1) * size))
        chunk = seq_len // (2 * world_size)
        second = 2 * world_size - 1 - rank
        return [*range(rank * chunk, (rank + 1) * chunk), *range(second * chunk, (second + 1) * chunk)]


def dilated_pattern(
    seq_len: int = 32,
    num_heads: int = 4,
    segment_lengths: Sequence[int] = (8, 16, 32),
    dilation_rates: Sequence[int] = (1, 2, 4),
    merge: str = "lse",
) -> Figure:
    """``C[h, t, s]`` (how many branches let query t see key s) for each head."""
    counts = ring_core.branch_counts(seq_len, num_heads, segment_lengths, dilation_rates, merge)
    top = int(counts.max().item())
    cmap = ListedColormap(["#ffffff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"][: top + 1])
    fig, axes = plt.subplots(1, num_heads, figsize=(3.1 * num_heads, 3.6), constrained_layout=True)
    for h, ax in enumerate(axes):
        image = ax.imshow(counts[h].numpy(), cmap=cmap, vmin=-0.5, vmax=top + 0.5, interpolation="nearest")
        ax.set_title(f"head {h}")
        ax.set_xlabel("key position s")
        if h == 0:
            ax.set_ylabel("query position t")
    bar = fig.colorbar(image, ax=axes, ticks=range(top + 1), shrink=0.8)
    bar.set_label("branches that allow (t, s)")
    fig.suptitle(
        f"ring_core.branch_counts: N={seq_len}, segment_lengths={list(segment_lengths)}, "
        f"dilation_rates={list(dilation_rates)}, merge={merge!r}"
    )
    return fig


def ring_schedule(world_size: int = 4) -> Figure:
    """Ring steps: at step j rank r computes with the K/V shard of rank (r - j) mod P."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), constrained_layout=True)
    cmap = ListedColormap(RANK_COLORS[:world_size])
    for ax, causal in zip(axes, (False, True)):
        owner = [[(r - step) % world_size for r in range(world_size)] for step in range(world_size)]
        ax.imshow(owner, cmap=cmap, vmin=-0.5, vmax=world_size - 0.5, aspect="auto")
        for step in range(world_size):
            for r in range(world_size):
                j = owner[step][r]
                if causal and j > r:  # contiguous layout: every key of shard j comes after every query of r
                    ax.add_patch(plt.Rectangle((r - 0.5, step - 0.5), 1, 1, color="white", alpha=0.85))
                    label = "skipped"
                elif causal and j == r:
                    label = f"K/V {j}\n(diagonal)"
                else:
                    label = f"K/V {j}"
                ax.text(r, step, label, ha="center", va="center", fontsize=9)
        ax.set_xticks(range(world_size), [f"rank {r}" for r in range(world_size)])
        ax.set_yticks(range(world_size), [f"step {s}" for s in range(world_size)])
        ax.set_title("causal, contiguous layout" if causal else "non-causal")
    fig.suptitle(
        f"Ring of P={world_size}: at step j rank r computes with the K/V of rank (r - j) mod P "
        "while the K/V for step j+1 is in flight"
    )
    return fig


def needed_keys(
    seq_len: int,
    world_size: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    layout: str = "contiguous",
    merge: str = "lse",
) -> torch.Tensor:
    """Bool ``(P, H, N)``: does some query of rank p's shard, head h, see key position s."""
    counts = ring_core.branch_counts(seq_len, num_heads, segment_lengths, dilation_rates, merge) > 0
    needed = torch.zeros(world_size, num_heads, seq_len, dtype=torch.bool)
    for p in range(world_size):
        rows = shard_positions(seq_len, p, world_size, layout)
        needed[p] = counts[:, rows, :].any(dim=1)
    return needed


def ring_dilated_sends(
    seq_len: int = 64,
    world_size: int = 4,
    num_heads: int = 4,
    segment_lengths: Sequence[int] = (8, 32, 64),
    dilation_rates: Sequence[int] = (1, 2, 4),
) -> Figure:
    """For each rank, the (head, key) rows it needs from every other rank; the rest never travels."""
    needed = needed_keys(seq_len, world_size, num_heads, segment_lengths, dilation_rates)
    owner = torch.empty(seq_len, dtype=torch.long)
    for p in range(world_size):
        owner[shard_positions(seq_len, p, world_size, "contiguous")] = p
    fig, axes = plt.subplots(
        world_size, 1, figsize=(10, 1.05 * num_heads * world_size / 2 + 1.4), sharex=True, constrained_layout=True
    )
    cmap = ListedColormap(["#ffffff", *RANK_COLORS[:world_size]])
    dense_rows = (world_size - 1) * (seq_len // world_size) * num_heads
    for p, ax in enumerate(axes):
        image = torch.where(needed[p], owner + 1, torch.zeros_like(owner))
        image[:, owner == p] = 0  # its own shard needs no communication
        received = int((image > 0).sum())
        sent = planned_rows(seq_len, world_size, p, num_heads, segment_lengths, dilation_rates)
        plan = "" if sent is None else f"; RingDilatedAttention's plan receives {sent}"
        ax.imshow(image.numpy(), cmap=cmap, vmin=-0.5, vmax=world_size + 0.5, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(num_heads), [f"h{h}" for h in range(num_heads)], fontsize=7)
        ax.set_ylabel(f"rank {p}", rotation=0, ha="right", va="center")
        ax.set_title(
            f"rank {p} needs {received} (head, key) rows from the others{plan}; a dense ring sends it {dense_rows}",
            fontsize=9,
            loc="left",
        )
        for boundary in range(1, world_size):
            ax.axvline(boundary * seq_len / world_size - 0.5, color="black", lw=0.6)
    axes[-1].set_xlabel("key position s (colour: the rank that holds it)")
    fig.suptitle(
        f"Dilated ring, N={seq_len}, P={world_size}: segment_lengths={list(segment_lengths)}, "
        f"dilation_rates={list(dilation_rates)}"
    )
    return fig


def planned_rows(
    seq_len: int,
    world_size: int,
    rank: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
) -> int | None:
    """(head, key) rows ``rank`` receives in the ring's plan (None if ring-core has no such plan)."""
    try:
        from ring_core.plugin import branches, build_ring_plan

        branch_list = tuple(branches(segment_lengths, dilation_rates, "lse", num_heads))
        plan = build_ring_plan(
            seq_len, world_size, rank, "contiguous", branch_list, num_heads, num_heads, False, torch.device("cpu")
        )
        return sum(
            (part.stop - part.start) * len(range(num_heads)[part.heads])
            for step in plan.steps
            for part in step.recv.kv_parts
        )
    except (ImportError, AttributeError, TypeError):  # the ring module changed shape: show the minimum only
        return None


def causal_work(seq_len: int, world_size: int, layout: str) -> torch.Tensor:
    """``(steps, P)``: allowed causal (query, key) pairs rank p computes at ring step k."""
    shards = [torch.tensor(shard_positions(seq_len, p, world_size, layout)) for p in range(world_size)]
    work = torch.zeros(world_size, world_size, dtype=torch.long)
    for step in range(world_size):
        for p in range(world_size):
            q, k = shards[p], shards[(p - step) % world_size]
            work[step, p] = int((k[None, :] <= q[:, None]).sum())
    return work


def zigzag_balance(seq_len: int = 64, world_size: int = 4) -> Figure:
    """Causal work per rank and step: the slowest rank sets each step's time."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9), constrained_layout=True)
    layouts = ("contiguous", "zigzag")
    works = {layout: causal_work(seq_len, world_size, layout) for layout in layouts}
    top = max(int(w.max()) for w in works.values())
    for ax, layout in zip(axes, layouts):
        work = works[layout]
        ax.imshow(work.numpy(), cmap="Blues", vmin=0, vmax=top, aspect="auto")
        for step in range(world_size):
            for p in range(world_size):
                ax.text(p, step, str(int(work[step, p])), ha="center", va="center", fontsize=9)
        ax.set_xticks(range(world_size), [f"rank {p}" for p in range(world_size)])
        ax.set_yticks(range(world_size), [f"step {s}" for s in range(world_size)])
        critical = int(work.max(dim=1).values.sum())
        ax.set_title(f"{layout}: critical path {critical} pairs")
    positions = torch.arange(world_size)
    width = 0.38
    for i, layout in enumerate(layouts):
        totals = works[layout].sum(dim=0)
        axes[2].bar(positions + (i - 0.5) * width, totals.numpy(), width, label=layout)
    axes[2].set_xticks(range(world_size), [f"rank {p}" for p in range(world_size)])
    axes[2].set_ylabel("causal (query, key) pairs")
    axes[2].set_title("total work per rank")
    axes[2].legend()
    fig.suptitle(f"Causal attention, N={seq_len}, P={world_size}: work per rank and ring step (allowed pairs)")
    return fig


def lse_merge(num_keys: int = 24, blocks: int = 3, head_dim: int = 8, seed: int = 0) -> Figure:
    """One query row: blocks merged by ``merge_into`` give exactly the full softmax."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, 1, head_dim, generator=generator, dtype=torch.float64)
    k = torch.randn(1, num_keys, 1, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(1, num_keys, 1, head_dim, generator=generator, dtype=torch.float64)
    scale = head_dim**-0.5
    kernel = MathKernel()
    out_acc = torch.zeros(1, 1, 1, head_dim, dtype=torch.float64)
    lse_acc = torch.full((1, 1, 1), float("-inf"), dtype=torch.float64)
    bounds = torch.linspace(0, num_keys, blocks + 1).round().long().tolist()
    block_lse = []
    for a, b in itertools.pairwise(bounds):
        out_b, lse_b = kernel.forward(q, k[:, a:b], v[:, a:b], scale=scale)  # lse (B, H, N)
        block_lse.append(float(lse_b.item()))
        merge_into(out_acc, lse_acc, out_b, lse_b.transpose(1, 2))
    full = torch.softmax((q[0, 0, 0] @ k[0, :, 0].T) * scale, dim=-1)
    expected = full @ v[0, :, 0]
    error = float((out_acc[0, 0, 0] - expected).abs().max())
    total = float(lse_acc.item())

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), constrained_layout=True, width_ratios=[3, 1])
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        scores = (q[0, 0, 0] @ k[0, a:b, 0].T) * scale
        inside = torch.softmax(scores, dim=-1)
        weight = torch.exp(torch.tensor(block_lse[i] - total))
        axes[0].bar(
            range(a, b), (inside * weight).numpy(), color=RANK_COLORS[i], label=f"block {i}: softmax x {weight:.3f}"
        )
    axes[0].plot(range(num_keys), full.numpy(), "k.", label="softmax over all keys")
    axes[0].set_xlabel("key")
    axes[0].set_ylabel("attention weight")
    axes[0].legend(fontsize=8)
    axes[0].set_title("each block's own softmax, rescaled by exp(lse_block - lse)")
    weights = [torch.exp(torch.tensor(x - total)).item() for x in block_lse]
    bottom = 0.0
    for i, w in enumerate(weights):
        axes[1].bar([0], [w], bottom=bottom, color=RANK_COLORS[i])
        axes[1].text(0, bottom + w / 2, f"{w:.3f}", ha="center", va="center", color="white")
        bottom += w
    axes[1].set_xticks([])
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("block weights sum to 1")
    fig.suptitle(
        f"LSE merge (ring_core.merge_into) of {blocks} blocks, float64: max |merged - softmax(QK^T)V| = {error:.1e}"
    )
    return fig


FIGURES: dict[str, Callable[[], Figure]] = {
    "dilated-pattern.png": dilated_pattern,
    "dilated-pattern-head-groups.png": lambda: dilated_pattern(merge="head_groups"),
    "ring-schedule.png": ring_schedule,
    "ring-dilated-sends.png": ring_dilated_sends,
    "zigzag-balance.png": zigzag_balance,
    "lse-merge.png": lse_merge,
}


def render_all(dpi: int = 110) -> dict[str, bytes]:
    """Every figure as PNG bytes, by file name."""
    images = {}
    for name, make in FIGURES.items():
        fig = make()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
        plt.close(fig)
        images[name] = buffer.getvalue()
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write the documentation's concept figures")
    parser.add_argument("--out", type=Path, default=Path("docs-figures"), help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in render_all().items():
        (args.out / name).write_bytes(data)
        print(args.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
