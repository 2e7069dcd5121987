"""The figures of the benchmarks page (and the README's headline panels), drawn from the published JSON.

Each returns a matplotlib figure; ``one_gpu_figure`` and ``ring_figure`` also draw into a given
axes (the headline puts both side by side).
"""

from __future__ import annotations

from typing import Any

from benchdata import CPU, FLEX, RING, SPARSE, load, mask, memory_runs, meta, one_gpu_numbers, ring_rows

COLORS = {"ours": "#4c72b0", "bare": "#55a868", "flex": "#c44e52", "cp": "#dd8452", "other": "#8172b3"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def one_gpu_figure(ax: Any = None) -> Any:
    plt = _plt()
    rows = one_gpu_numbers()
    figure = None
    if ax is None:
        figure, ax = plt.subplots(figsize=(6.4, 3.6), constrained_layout=True)
    names = [("bare cuDNN calls", "bare", "bare cuDNN calls (no gather, no merge)"),
             ("ring_dilated_flash", "ours", "ring_dilated_flash (this library)"),
             ("FlexAttention", "flex", "FlexAttention (same attention)")]  # fmt: skip
    for i, (name, color, label) in enumerate(names):
        values = [rows[name][causal]["ms"] for causal in (False, True)]
        bars = ax.bar([x + (i - 1) * 0.27 for x in (0, 1)], values, 0.27, color=COLORS[color], label=label)
        ax.bar_label(bars, [f"{v:.1f}" for v in values], fontsize="small", padding=2)
    ax.set_xticks([0, 1], ["non-causal", "causal"])
    ax.set_ylabel("forward+backward (ms), lower is better")
    config = load(FLEX)["meta"]["title"].split(", ", 1)[1].replace("; forward+backward", "")
    ax.set_title(f"Exact dilated attention on one {meta(load(FLEX))['card']}\n{config}", fontsize="medium")
    ax.legend(fontsize="small", frameon=False)
    ax.set_ylim(0, 1.45 * max(r["ms"] for row in rows.values() for r in row.values()))  # room for the legend
    return figure


def tokens_figure() -> Any:
    plt = _plt()
    figure, ax = plt.subplots(figsize=(6.4, 3.6), constrained_layout=True)
    for (_, card, mem), color in zip(memory_runs(), (COLORS["ours"], COLORS["cp"])):
        fits = [mem["at_target"], mem["largest"]]
        xs = [r["N"] / 1e6 for r in fits]
        ax.plot(xs, [r["peak_gib"] for r in fits], "o", color=color, label=f"{card}: peak of a step that fits")
        failed = [int(n) / 1e6 for n, ok in mem["tried"].items() if not ok]
        ax.plot(failed, [mem["card_gib"]] * len(failed), "x", color=color, label=f"{card}: out of memory")
        ax.axhline(mem["card_gib"], color=color, lw=0.8, ls=":")
        ax.annotate(f"{card} ({mem['card_gib']:.0f} GiB)", (0.1, mem["card_gib"]), fontsize="x-small", va="bottom")
    floor = memory_runs()[0][2]["floor_gib_per_million_tokens"]
    ax.plot([0, 11], [0, floor * 11], color="#999999", lw=1, label="q, k, v, out and gradients alone")
    ax.set_xlabel("sequence length N (millions of tokens)")
    ax.set_ylabel("peak memory of forward+backward (GiB)")
    config = memory_runs()[0][2]["config"]
    ax.set_title(
        f"ring_dilated_flash, bf16, B=1 H={config['H']} D={config['D']}, segments {config['segments']}",
        fontsize="medium",
    )
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 160)
    ax.legend(fontsize="x-small", frameon=False, loc="lower right")
    return figure


def ring_figure(ax: Any = None) -> Any:
    plt = _plt()
    figure = None
    if ax is None:
        figure, ax = plt.subplots(figsize=(6.4, 3.6), constrained_layout=True)
    rows = ring_rows()
    for case, style in (("dense causal zigzag", "-"), ("dense non-causal", "--")):
        mine = [r for r in rows if r["case"] == case]
        ps = [r["P"] for r in mine]
        ax.plot(ps, [r["tflops_per_gpu"] for r in mine], style, marker="o", color=COLORS["ours"],
                label=f"ring (this library), {case}")  # fmt: skip
        ax.plot(ps, [r["cp_tflops_per_gpu"] for r in mine], style, marker="s", color=COLORS["cp"],
                label=f"PyTorch context parallel, {case}")  # fmt: skip
    dilated = [r for r in rows if r["case"].startswith("dilated")]
    ax.plot([r["P"] for r in dilated], [r["tflops_per_gpu"] for r in dilated], ":", marker="^", color=COLORS["ours"],
            label="ring (this library), dilated (no context parallel equivalent)")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["P"] for r in rows}), [str(p) for p in sorted({r["P"] for r in rows})])
    ax.set_xlabel("GPUs (32,768 tokens each)")
    ax.set_ylabel("TFLOP/s per GPU, higher is better")
    ax.set_ylim(0, 700)
    ax.set_title(f"Ring weak scaling on {meta(load(RING))['card']}, bf16, H=16, D=128", fontsize="medium")
    ax.legend(fontsize="x-small", frameon=False, loc="lower left")
    return figure


def blocksparse_figure() -> Any:
    plt = _plt()
    figure, ax = plt.subplots(figsize=(7.8, 3.6), constrained_layout=True)
    data = load(SPARSE)
    flex = [r for r in data["results"] if r["method"] == "flex"]
    for (pattern, causal), color in zip(
        [("local", False), ("random", False), ("local", True), ("random", True)],
        [COLORS["ours"], COLORS["other"], COLORS["bare"], COLORS["flex"]],
    ):
        rows = sorted(
            (r for r in flex if r["pattern"] == pattern and r["causal"] == causal), key=lambda r: r["density"]
        )
        ax.plot([r["density"] for r in rows], [r["fwd_bwd_ms"] for r in rows], marker="o", color=color,
                label=f"{pattern} blocks, {mask(causal)}")  # fmt: skip
    for causal, style in ((False, "--"), (True, ":")):
        dense = data["dense"]["causal" if causal else "full"]["fwd_bwd_ms"]
        ax.axhline(dense, color="#666666", ls=style, lw=1, label=f"dense SDPA cuDNN, {mask(causal)}")
    ax.set_xlabel("density (fraction of (query block, key block) pairs kept)")
    ax.set_ylabel("forward+backward (ms)")
    ax.set_xlim(0, 0.55)
    ax.set_title(f"Block-sparse attention (FlexAttention path) on one {meta(data)['card']}\n"
                 "bf16, B=1 N=65,536 H=16 D=128, blocks of 128", fontsize="medium")  # fmt: skip
    ax.set_ylim(0, None)
    ax.legend(fontsize="x-small", frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1))
    return figure


def cpu_figure() -> Any:
    import matplotlib
    import matplotlib.ticker

    plt = _plt()
    figure, ax = plt.subplots(figsize=(6.4, 3.6), constrained_layout=True)
    results = load(CPU)["results"]
    for name in dict.fromkeys(r["name"] for r in results):
        rows = [r for r in results if r["name"] == name]
        kernel = ", ".join(dict.fromkeys(r["kernel"] for r in rows))
        ax.plot([r["seq_len"] for r in rows], [r["time_ms"] / 1e3 for r in rows], marker="o",
                label=f"{name} ({kernel})", color="black" if name == "sdpa" else None)  # fmt: skip
    lengths = sorted({r["seq_len"] for r in results})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward+backward (s)")
    info = meta(load(CPU))
    ax.set_title(
        f"{info['card']}, {info['dtype']}\nsegments {info['segments']}, rates {info['rates']}", fontsize="medium"
    )
    ax.legend(fontsize="x-small", frameon=False)
    return figure
