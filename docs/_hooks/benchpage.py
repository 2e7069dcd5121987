"""The benchmarks page as answers: one generated block per question, from the published JSON.

``docs/benchmarks.md`` holds the questions (headings) and a ``<!-- answer: NAME -->`` marker
under each; :func:`answer` returns the block that replaces it: a conclusion sentence computed
from the numbers, the figure (served as ``benchmarks/answer-NAME.png``), tables with human
column names and units where every row names its kernel, where the numbers come from, and
the files of older runs and variants folded away. Nothing here is typed by hand: a number
changes when its JSON does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from benchdata import (
    CPU,
    CPU_LONG,
    DISPATCH,
    FLEX,
    MULTIHEAD,
    RING,
    SPARSE,
    SPARSE_RING,
    STRIPS,
    STRIPS_BATCHED,
    STRIPS_BLOCK_TILES,
    STRIPS_COMPILED,
    STRIPS_GATHER,
    STRIPS_RING,
    STRIPS_RING_KERNELS,
    folded,
    load,
    mask,
    memory_runs,
    meta,
    one_gpu_numbers,
    ring_rows,
    source,
    strip_patterns,
    table,
)
from benchfigures import blocksparse_figure, cpu_figure, one_gpu_figure, ring_figure, tokens_figure


@dataclass
class Answer:
    conclusion: str
    figure: Callable[[], Any]
    tables: list[str]
    more: list[str] = field(default_factory=list)  # folded blocks


def _code(name: str) -> str:
    """An implementation's name as code; a description (with spaces) as text."""
    return name if " " in name else f"`{name}`"


# -- how fast on one GPU ----------------------------------------------------------------------
def one_gpu() -> Answer:
    rows = one_gpu_numbers()
    ours, bare, flex = rows["ring_dilated_flash"], rows["bare cuDNN calls"], rows["FlexAttention"]
    conclusion = (
        f"On one {meta(load(FLEX))['card']}, exact dilated attention through `ring_dilated_flash` runs at "
        f"**{bare[False]['ms'] / ours[False]['ms']:.2f}** of the speed of the bare cuDNN calls it is built on "
        f"({bare[True]['ms'] / ours[True]['ms']:.2f} causal) and **{flex[False]['ms'] / ours[False]['ms']:.1f}x** "
        f"as fast as the same attention written with FlexAttention ({flex[True]['ms'] / ours[True]['ms']:.1f}x "
        "causal). Both compute the exact result (bf16 errors below). The dense special case runs within "
        f"{max(r['ours_over_sdpa'] for r in load('flash-dilated-h100.json')['dense']['rows']) - 1:.0%} of plain "
        "SDPA's time on the same kernel; with flash-attn 4 installed the default dispatch picks the faster "
        "kernel per block shape, and the `nn.MultiheadAttention` drop-in runs "
        f"{min(r['speed_vs_nn'] for r in load(MULTIHEAD)['rows']):.2f}-"
        f"{max(r['speed_vs_nn'] for r in load(MULTIHEAD)['rows']):.2f}x as fast as `nn.MultiheadAttention`."
    )
    timing = table(
        ["implementation", "kernel", "mask", "time (ms)", "useful TFLOP/s", "speed vs bare cuDNN", "extra memory (GiB)"],
        [
            [_code(r["name"]), f"`{r['kernel']}`", mask(r["causal"]), f"{r['ms']:.1f}", f"{r['tflops']:.0f}",
             f"{r['bare_over_this']:.2f}", f"{r['extra_peak_gib']:.2f}"]
            for r in sorted(load(FLEX)["results"], key=lambda r: (r["causal"], -r["bare_over_this"]))
        ],
    )  # fmt: skip
    kernel = {r["name"]: r["kernel"] for r in load(FLEX)["results"]}
    accuracy = table(
        ["implementation", "kernel", "mask", "error, output", "error, dq", "error, dk", "error, dv"],
        [
            [_code(r["name"]), f"`{kernel[r['name']]}`", mask(r["causal"])]
            + [f"{r[k]:.1e}" for k in ("out", "dq", "dk", "dv")]
            for r in load(FLEX)["accuracy"]["rows"]
        ],
    )
    acc = load(FLEX)["accuracy"]["rows"][0]
    dense_file = "flash-dilated-h100.json"
    dense = table(
        ["N (tokens)", "mask", "kernel", "SDPA cuDNN (ms)", "`ring_dilated_flash` (ms)", "speed-up vs SDPA"],
        [
            [f"{r['N']:,}", mask(r["causal"]), "`sdpa_cudnn`", f"{r['sdpa_cudnn_ms']:.2f}", f"{r['ours_ms']:.2f}",
             f"{1 / r['ours_over_sdpa']:.2f}x"]
            for r in load(dense_file)["dense"]["rows"]
        ],
    )  # fmt: skip
    tables = [
        "Forward+backward, bf16, B=1, N=65,536, H=16, D=128, segments [2048, 4096, 8192], rates [1, 2, 4]. "
        "*Speed vs bare cuDNN* is the bare calls' time / this time (1 = as fast as the floor); *useful* "
        "TFLOP/s counts only the query/key pairs the pattern allows.\n\n" + timing + "\n\n" + source(FLEX),
        f"Errors against the float64 reference (relative, bf16, N={acc['N']:,}, H={acc['H']}, D={acc['D']}, "
        "the same inputs for both): SDPA's own bf16 error on such inputs is about 4e-3.\n\n" + accuracy,
        "The dense special case (`segment_lengths=[N]`, rate 1) against plain SDPA with the same kernel:\n\n"
        + dense
        + "\n\n"
        + source(dense_file),
        dispatch_table(),
        multihead_table(),
    ]
    more = [
        folded("flash-dilated-h200.json", "Variants on one H200: Triton or torch merges, core engine, CUDA graphs"),
        folded("flash-dilated-h100.json", "The same on one H100 (kernels, dilated, dense, memory, accuracy)"),
        folded(
            "core-cuda-h200.json", "Older run: ring-core alone on a GPU (its portable `math` kernel)",
            "These rows ran ring-core's portable `math` kernel (`python -m tools.bench.core --device cuda`, kernel `math`): "
            "what a GPU does without ring-flash's kernels. Install `ring-flash` on GPUs.",
        ),
        folded(
            "core-cli-bench-cuda-h200.json", "Older run: `ring-attention bench` with ring-core alone (kernel `math`)",
            "`dilated` here ran ring-core's portable `math` kernel; *time / SDPA's time* above 1 means slower. "
            "Newer `bench` output names the kernel of every row and shows the speed-up instead.",
        ),
    ]  # fmt: skip
    return Answer(conclusion, one_gpu_figure, tables, more)


MULTIHEAD_FORMS = {
    "none": "no mask",
    "hint": "causal attn_mask and is_causal=True",
    "is_causal": "is_causal=True alone",
    "mask": "causal attn_mask alone",
}


def dispatch_table() -> str:
    """Each kernel forced, then the default dispatch, on the same blocks (flash-attn 4 installed)."""
    rows = []
    for r in load(DISPATCH)["rows"]:
        forced = {k.removesuffix(" ms"): v for k, v in r.items() if k.endswith(" ms") and k != "dispatch ms"}
        best = min(forced.values())
        case = r["case"].split(" [")[0].removesuffix(" causal")
        for kernel, ms in sorted(forced.items(), key=lambda item: item[1]):
            rows.append([case, mask(r["causal"]), f"`{kernel}` (forced)", f"{ms:.2f}", f"{best / ms:.2f}"])
        picks = ", ".join(choice.split(": ")[1] for choice in r["tuned_choices"])
        rows.append([case, mask(r["causal"]), f"`{r['dispatch_picks']}` (default, picks `{picks}`)",
                     f"{r['dispatch ms']:.2f}", f"{1 / r['dispatch_vs_best_forced']:.2f}"])  # fmt: skip
    table_ = table(["case", "mask", "kernel", "time (ms)", "speed vs the fastest forced kernel"], rows)
    return (
        "Which kernel computes the blocks: `ring_dilated_flash` (bf16, H=16, D=128; dilated: segments [2048, "
        "4096, 8192], rates [1, 2, 4]) with each kernel forced, then with the default dispatch, which follows "
        "the card's measured table (`ring_flash/tables/nvidia-h200.json`, drawn below; `ring-attention info` "
        "prints it):\n\n"
        + table_
        + "\n\n![kernel table](benchmarks/flash-kernel-table-h200.png)\n\n"
        + source(DISPATCH)
    )


def multihead_table() -> str:
    """The ``nn.MultiheadAttention`` drop-in against ``nn.MultiheadAttention`` itself, in every causal form."""
    rows = [
        [MULTIHEAD_FORMS.get(r["form"], r["form"]), "not recorded by this run", f"{r['ours ms']:.2f}",
         f"{r['nn ms']:.2f}", f"{r['speed_vs_nn']:.2f}x", f"{r['output_difference_bf16']:.1e}"]
        for r in load(MULTIHEAD)["rows"]
    ]  # fmt: skip
    header = ["causal form", "kernel", "`MultiheadDilatedAttention` (ms)", "`nn.MultiheadAttention` (ms)",
              "speed-up vs `nn.MultiheadAttention`", "output difference (bf16)"]  # fmt: skip
    return (
        "The `nn.MultiheadAttention` drop-in (`multihead_dilated`, dense configuration, same weights, "
        f"{load(MULTIHEAD)['what'].removeprefix('ms per forward+backward, ')}):\n\n"
        + table(header, rows)
        + "\n\n"
        + source(MULTIHEAD)
    )


# -- how far does one GPU go ------------------------------------------------------------------
def tokens() -> Answer:
    runs = memory_runs()
    _name, card, mem = runs[0]
    at, largest = mem["at_target"], mem["largest"]
    floor = mem["floor_gib_per_million_tokens"] * at["N"] / 1e6
    others = "; ".join(f"{c}: {m['largest']['N']:,}" for _, c, m in runs[1:])
    conclusion = (
        f"One {card} ({mem['card_gib']:.0f} GiB) runs forward and backward of exact dilated attention over "
        f"**{at['N']:,} tokens** (H={mem['config']['H']}, D={mem['config']['D']}, bf16) with a peak of "
        f"{at['peak_gib']:.0f} GiB, **{at['peak_gib'] / floor:.2f}x** the memory of q, k, v, the output and "
        f"their gradients themselves; the largest length that fits is {largest['N']:,} ({others})."
    )
    rows = []
    for file, card_name, m in runs:
        kernel = meta(load(file)).get("kernel", "sdpa_cudnn").split(" ")[0]
        for label, r in (("at the target", m["at_target"]), ("largest that fits", m["largest"])):
            tensors = m["floor_gib_per_million_tokens"] * r["N"] / 1e6
            rows.append([card_name, label, f"{r['N']:,}", f"`{kernel}`", f"{r['peak_gib']:.1f}",
                         f"{r['forward_peak_gib']:.1f}", f"{r['peak_gib'] / tensors:.2f}", f"{r['seconds']:.1f}"])  # fmt: skip
    memory_table = table(
        ["card", "run", "N (tokens)", "kernel", "peak (GiB)", "forward peak (GiB)", "peak / tensors", "step (s)"], rows
    )
    tables = [
        "One forward+backward step of `ring_dilated_flash` (B=1, segments [2048, 4096, 8192], rates [1, 2, 4]). "
        "*peak / tensors*: the allocator's peak over the size of q, k, v, out, dout, dq, dk, dv; *step*: "
        "the wall time of that step, first call included.\n\n"
        + memory_table
        + "\n\n"
        + "\n".join(source(file) for file, _, _ in runs)
    ]
    return Answer(conclusion, tokens_figure, tables)


# -- how does the ring scale ------------------------------------------------------------------
def ring() -> Answer:
    rows = ring_rows()
    top = max(r["P"] for r in rows)

    def row(case: str, p: int) -> dict:
        return next(r for r in rows if r["case"] == case and r["P"] == p)

    causal, causal_1 = row("dense causal zigzag", top), row("dense causal zigzag", 1)
    dilated = [r for r in rows if r["case"].startswith("dilated")]
    conclusion = (
        f"With 32,768 tokens per GPU, the ring on {top} {meta(load(RING))['card']} keeps "
        f"**{causal['tflops_per_gpu'] / causal_1['tflops_per_gpu']:.0%}** of one GPU's throughput per GPU on "
        f"dense causal attention and runs **{causal['ours_over_cp']:.2f}x** as fast as PyTorch's own context "
        f"parallel on the same GPUs (non-causal {row('dense non-causal', top)['ours_over_cp']:.2f}x). Dilated "
        "attention whose segments fit in a shard sends nothing: its time per step stays at "
        f"{min(r['ms'] for r in dilated):.1f}-{max(r['ms'] for r in dilated):.1f} ms from 1 to {top} GPUs."
    )
    body = [
        [r["case"].split(" [")[0], r["P"], f"{r['ms']:.1f}", f"{r['cp_ms']:.1f}" if "cp_ms" in r else "-",
         f"{r['ours_over_cp']:.2f}x" if "ours_over_cp" in r else "-", f"{r['tflops_per_gpu']:.0f}",
         f"{(r['bytes_fwd'] + r['bytes_bwd']) / 2**20:,.0f}", f"`{r['kernel']}`"]
        for r in rows
    ]  # fmt: skip
    timing = table(
        ["case", "GPUs", "ring (ms)", "context parallel (ms)", "speed-up vs context parallel", "TFLOP/s per GPU",
         "sent per GPU (MiB)", "kernel"],
        body,
    )  # fmt: skip
    tables = [
        "Forward+backward, bf16, B=1, H=16, D=128, 32,768 tokens per GPU (N grows with the GPUs); dilated: "
        "segments [2048, 8192, 32768], rates [1, 2, 4]. PyTorch's context parallel "
        "(`torch.distributed.tensor.experimental.context_parallel`) runs its cuDNN SDPA backend; it has no "
        "dilated attention.\n\n" + timing + "\n\n" + source(RING)
    ]
    more = [
        folded("ring-2xh200.json", "Newest run on 2 H200 (final code; NCCL and copy-engine transports)"),
        folded("ring-4xh200-copy-engine.json", "4 H200 with the copy-engine transport (timing, profile)"),
        folded("overlap-2xh200.json", "What a transfer costs the attention kernels, by transport"),
        folded("distributed-4xh200.json", "ring-distributed on 4 H200: ring, Ulysses, hybrid, all-gather"),
        folded("distributed-2xh200.json", "ring-distributed on 2 H200"),
    ]
    return Answer(conclusion, ring_figure, tables, more)


# -- block-sparse ---------------------------------------------------------------------------------
def _strip_kernel(row: dict) -> str:
    """The sparse calls' kernel; dense strips go to the registry's dispatch, which the run does not record."""
    if row.get("flash_attn4_calls"):
        return "`flash_attn4` (block-sparse)"
    return "`flex_attention`" if row.get("flex_calls") else "not recorded by this run"


def blocksparse() -> Answer:
    strips, later = load(STRIPS), load(STRIPS_RING)
    patterns = strip_patterns()
    dilated = [r for r in later["results"] if r["section"] == "dilated"]
    with_layout = [r for r in dilated if r["name"] != "no layout"]
    gather = next(r for r in load(STRIPS_GATHER)["results"] if r["section"] == "gather")
    packed_gather = next(
        r for r in load(STRIPS_COMPILED)["results"] if r["section"] == "packed" and r["method"] == "gather"
    )
    later_runs = load(STRIPS_BATCHED)["results"]
    packed, packed_compiled = (
        next(r for r in later_runs if r["section"] == "packed" and r["compiled"] == compiled)
        for compiled in (False, True)
    )
    compiled = [r["vs_eager"] for r in later_runs if r["section"] == "compiled"]
    ring = load(STRIPS_RING_KERNELS)["ring"]
    tiles_run = load(STRIPS_BLOCK_TILES)
    fine = [r for r in tiles_run["results"] if r["section"] == "dilated" and r["name"] == "random"]
    coarse = [r for r in tiles_run["results"] if r["section"] == "128-row tiles"]
    fine_ratios = " and ".join(f"{r['vs_plain_dilated']:.2f}" for r in fine)
    coarse_ratios = " and ".join(f"{r['vs_block_tiles']:.2f}" for r in coarse)
    dense, later_dense = strips["baselines"], later["baselines"]
    conclusion = (
        f"At 10% density (N=65,536, one {meta(strips)['card']}, flash-attn 4 installed) every registered "
        f"pattern takes **{min(r['vs_dense'] for r in patterns):.3f}-{max(r['vs_dense'] for r in patterns):.3f}** "
        f"of dense cuDNN attention's time ({1 / max(r['vs_dense'] for r in patterns):.1f}-"
        f"{1 / min(r['vs_dense'] for r in patterns):.1f}x faster), causal or not. With dilated branches "
        f"[2048, 4096, 8192]/[1, 2, 4] a 10% layout costs {min(r['vs_plain_dilated'] for r in with_layout):.2f}-"
        f"{max(r['vs_plain_dilated'] for r in with_layout):.2f}x plain dilated attention's time (a later run on "
        "the same card): a 128-row kernel tile of a rate-r branch spans r layout blocks, so the layout removes "
        "little of the kernels' work. "
        f"The gather path, now taken only with dropout, "
        f"is {gather['vs_flex']:.1f}x the strips (a third run). Under `torch.compile(fullgraph=True)` the strips "
        f"take {min(compiled):.2f}-{max(compiled):.2f}x their eager time (one op whose backward recomputes each "
        f"FlexAttention call; a fifth run); packed documents starting anywhere took "
        f"{packed['fwd_bwd_ms']:.1f} ms on the strips ({packed_compiled['fwd_bwd_ms']:.1f} ms compiled; a branch's "
        f"calls batched) against {packed_gather['fwd_bwd_ms']:,.0f} ms on the gather path (a fourth run); and the "
        f"sparse ring's steps simulated at {ring['world_size']} ranks cost {ring['vs_one_gpu']:.2f}x the one-GPU "
        f"run, of which the split into steps itself is {ring['kernels_vs_one_gpu']:.2f}x (the same steps' kernels "
        f"alone) and the steps' merges and accumulation {ring['vs_kernels']:.2f}x their kernels (a sixth run). "
        f"A scattered (random) layout with those branches takes kernel tiles of one layout block at rates 2 and 4 "
        f"(64 and 32 rows) where they visit at most half the pairs of 128-row tiles: on one {meta(tiles_run)['card']} "
        f"it then costs {fine_ratios} of plain dilated attention's time (full and causal), where 128-row tiles "
        f"take {coarse_ratios}x as long (a seventh run)."
    )
    pattern_rows = [
        [r["name"], _strip_kernel(r), mask(r["causal"]), f"{r['density']:.3f}", f"{r['fwd_bwd_ms']:.1f}",
         f"{dense['causal' if r['causal'] else 'full']['dense_sdpa_cudnn_ms']:.1f}", f"{r['vs_dense']:.3f}",
         f"{1 / r['vs_dense']:.1f}x"]
        for r in sorted(patterns, key=lambda r: (r["causal"], r["name"]))
    ]  # fmt: skip
    dilated_rows = [
        [r["name"], _strip_kernel(r), mask(r["causal"]), f"{r['fwd_bwd_ms']:.1f}", f"{later_dense['causal' if r['causal'] else 'full']['plain_dilated_ms']:.1f}",
         f"{r['vs_plain_dilated']:.3f}"]
        for r in dilated
    ]  # fmt: skip
    tables = [
        "Every registered pattern at density 0.10 with one rate-1 branch, forward+backward, bf16, B=1, N=65,536, "
        "H=16, D=128, blocks of 128 tokens; *vs dense* is this time / dense SDPA cuDNN's (same mask, same run):\n\n"
        + table(["pattern", "kernel", "mask", "density", "time (ms)", "dense cuDNN (ms)", "vs dense", "speed-up"],
                pattern_rows)
        + "\n\n" + source(STRIPS),
        "A 10% layout with dilated branches [2048, 4096, 8192]/[1, 2, 4] (a later run, same card and shapes); "
        "*vs plain dilated* is this time / plain dilated attention's (`ring_dilated_flash`, no layout, same run):\n\n"
        + table(["layout", "kernel", "mask", "time (ms)", "plain dilated (ms)", "vs plain dilated"], dilated_rows)
        + "\n\n" + source(STRIPS_RING),
        "Random 10% + dilated branches with block tiles (strips of rates 2 and 4 at 64 and 32 rows, the default on "
        "CUDA where they visit at most half the pairs) and with every call at 128-row tiles "
        "(`RING_BLOCKSPARSE_BLOCK_TILES=0`), one run on one H100; *ratio* is against plain dilated attention (same "
        "run), or for the 128-row rows against the block tiles' time:\n\n"
        + table(["section", "layout", "mask", "time (ms)", "ratio"],
                [[r["section"], r["name"], mask(r["causal"]), f"{r['fwd_bwd_ms']:.2f}",
                  f"{r.get('vs_plain_dilated', r.get('vs_block_tiles')):.3f}"] for r in tiles_run["results"]])
        + "\n\n" + source(STRIPS_BLOCK_TILES),
    ]  # fmt: skip
    ring_rows_2 = load(SPARSE_RING)["results"]
    ring_table = table(
        ["pattern", "mask", "kernel", "one GPU, gather (ms)", "one GPU, FlexAttention (ms)", "ring of 2 GPUs (ms)",
         "speed-up vs one GPU (gather)"],
        [
            [r["pattern"], mask(r["causal"]), "`sdpa_cudnn`", f"{r['one_gpu_gather_ms']:.1f}",
             f"{r['one_gpu_flex_ms']:.1f}", f"{r['ring_2_gpus_ms']:.1f}", f"{r['speedup_vs_one_gpu_gather']:.2f}x"]
            for r in ring_rows_2
        ],
    )  # fmt: skip
    more = [
        folded(STRIPS, "Every row of the strips run (patterns, dilated + layout, gather, the simulated ring)"),
        folded(STRIPS_RING, "The later run: dilated + layout and the simulated ring"),
        folded(STRIPS_GATHER, "The third run: the gather path against the strips (and dilated + layout again)"),
        folded(STRIPS_COMPILED, "The fourth run: the strips compiled, and packed documents starting anywhere (strips, compiled strips, gather path)"),
        folded(STRIPS_BATCHED, "The fifth run: a branch's FlexAttention calls batched (dilated + layout, compiled, packed)"),
        folded(STRIPS_RING_KERNELS, "The sixth run: the simulated ring, and the same steps' kernels alone"),
        folded(SPARSE, "Time vs density on FlexAttention alone (the figure; before flash-attn 4 took the calls)"),
        '??? note "The sparse ring over 2 GPUs (an older run, on the gather path)"\n    '
        + (ring_table + "\n\n" + source(SPARSE_RING)).replace("\n", "\n    ") + "\n",
        folded("blocksparse-strips-fa4-nomask-h200.json",
               "Dilated + layout with the token rule's calls on FlexAttention (`RING_BLOCKSPARSE_FA4_MASK=0`, A/B)"),
        folded("blocksparse-sweep-h200.json", "FlexAttention kernel options swept (the defaults come from here)"),
        folded("blocksparse-tma-h200.json", "FlexAttention with TMA loads"),
    ]  # fmt: skip
    return Answer(conclusion, blocksparse_figure, tables, more)


# -- CPU ------------------------------------------------------------------------------------------
def cpu() -> Answer:
    data, info = load(CPU), meta(load(CPU))
    longest = max(r["seq_len"] for r in data["results"])
    last = [r for r in data["results"] if r["seq_len"] == longest and r["name"] != "sdpa"]
    dilated = next(r for r in last if r["name"] == "dilated")
    sdpa = next(r for r in data["results"] if r["seq_len"] == longest and r["name"] == "sdpa")
    conclusion = (
        f"On the CPU ({info['card']}, {info['dtype']}) every implementation runs (`ring-attention verify` "
        "checks each against the reference), for development and tests: at N={:,} `dilated` takes {:.1f} s "
        "per forward+backward, "
        "{:.2f}x the speed of PyTorch's SDPA (which computes dense attention), with a peak of {:,.0f} MiB "
        "against SDPA's {:,.0f} MiB."
    ).format(
        longest, dilated["time_ms"] / 1e3, dilated["speedup_vs_sdpa"], dilated["peak_mem_mib"], sdpa["peak_mem_mib"]
    )
    rows = [
        [f"`{r['name']}`", f"`{r['kernel']}`", f"{r['seq_len']:,}", f"{r['time_ms']:,.0f}",
         f"{r['speedup_vs_sdpa']:.2f}x", f"{r['tflops']:.3f}", f"{r['peak_mem_mib']:,.0f}"]
        for r in data["results"]
    ]  # fmt: skip
    main = table(
        ["implementation", "kernel", "N", "time (ms)", "speed-up vs SDPA", "useful TFLOP/s", "peak (MiB)"], rows
    )
    long_rows = [
        [r["name"], "`cpu_flash` (the CPU's first kernel; not recorded by that run)", f"{r['seq_len']:,}", f"{r['time_ms'] / 1e3:.1f}",
         f"{r['tflops']:.3f}", f"{r['peak_mem_mib']:,.0f}"]
        for r in load(CPU_LONG)["results"]
    ]  # fmt: skip
    tables = [
        f"`ring-attention bench`, B={info['batch']}, H={info['heads']}, D={info['head_dim']}. *speed-up vs SDPA* "
        "is SDPA's time / this time (above 1: faster); *peak* is the CPU allocator's peak above the memory held "
        "before the step; several processes shared the 2 cores, so times vary by tens of percent.\n\n"
        + main + "\n\n" + source(CPU),
        "Longer, N=65,536, float32, H=8, D=64, segments [2048, 4096, 8192], rates [1, 2, 4] "
        "(`tools/bench_core.py`, now `python -m tools.bench.core`; its peak is the resident set's growth, "
        "sampled):\n\n"
        + table(["what", "kernel", "N", "time (s)", "useful TFLOP/s", "peak (MiB)"], long_rows)
        + "\n\n" + source(CPU_LONG),
    ]  # fmt: skip
    return Answer(conclusion, cpu_figure, tables)


ANSWERS: dict[str, Callable[[], Answer]] = {
    "one-gpu": one_gpu,
    "tokens": tokens,
    "ring": ring,
    "blocksparse": blocksparse,
    "cpu": cpu,
}


def figure_path(name: str) -> str:
    return f"benchmarks/answer-{name}.png"


def answer_markdown(name: str) -> str:
    """The block that replaces ``<!-- answer: NAME -->`` on docs/benchmarks.md."""
    result = ANSWERS[name]()
    parts = [f"**Answer.** {result.conclusion}", f"![{name}]({figure_path(name)})", *result.tables]
    if result.more:
        parts.append("Older runs and variants, folded:\n\n" + "\n".join(result.more))
    return "\n\n".join(parts) + "\n"


def figures() -> dict[str, Any]:
    """``{site path: figure factory}`` of every answer."""
    return {figure_path(name): (lambda name=name: ANSWERS[name]().figure()) for name in ANSWERS}
