"""Block-sparse attention on strips against its baselines, in one run: dilated + layout, patterns at 10%, the
gather path, packed documents, and the sparse ring's steps simulated on one GPU.

    python -m tools.bench.blocksparse_strips --json docs/benchmarks/blocksparse-strips-h200.json \\
        --plot docs/benchmarks/blocksparse-strips-h200.png

Everything is forward+backward (``torch.autograd.grad(out, (q, k, v), dout)``), bf16, timed with CUDA
events (median of ``--repeats`` after a warm-up that builds the plan and compiles), against baselines
measured in the same run:

- ``dense``: ``scaled_dot_product_attention`` forced to cuDNN, same causality;
- ``dilated``: plain dilated attention (``ring_dilated_flash``, no layout) of the same branches;
- ``flex``: for the gather path, the strip path on the same work;
- ``packed``: packed documents (``cu_seqlens``: lengths 512-4096, multiples of every rate, or of
  ``--packed-multiple``) with the band layout and the dilated branches, causal, on the strips against the
  gather path on the same documents (where the gather path took every packed call before), the strips
  compiled, and the strips on the same tokens unpacked;
- ``eager``: for the ``compiled`` rows (``torch.compile(fullgraph=True)``), the eager strips on the same work;
- ``batched``: for the ``unbatched`` rows (``RING_BLOCKSPARSE_BATCH=0``: every strip call alone), the same band
  + dilated rows (full, causal, packed) with a branch's calls batched (no target: what batching saves);
- ``block tiles``: for the ``128-row tiles`` rows (``RING_BLOCKSPARSE_BLOCK_TILES=0``), the same random + dilated
  rows (full, causal), whose strips of rates 2 and 4 take tiles of one layout block (no target: what they save);
- ``autograd backward``: with FlexAttention's backward operator on (the default; ``RING_BLOCKSPARSE_FLEX_BACKWARD=0``
  switches it off), the ring again with it off (each step's calls run forward again for autograd): ``ring_autograd``.

Targets (each row says which applies): dilated + layout at most ``dilated x kept x 1.15`` where ``kept``
is the fraction of the branches' (query, key) pairs the layout keeps (counted from the plan); a pattern
at density ~0.1 with one rate-1 branch at most ``0.12 x dense`` (scaled by density / 0.1 where a
pattern's options cannot hit 0.1); the gather path and compiled strips at most ``1.2 x`` their baseline; the ring (``--ring P``
ranks simulated on one GPU: each rank's steps run on the rows the plan sends, scattered into the
source shard as the ring does) at most ``1.1 x`` the one-GPU time of the same tiles; reported beside it, the
same tiles split into the same steps with the kernels alone (no merge, accumulation or placing): what the
split itself costs against one GPU, and what the steps add to their kernels. Each unpacked strips row
counts its work: the pairs the layout keeps, the pairs in the tiles the kernels visit and of those the pairs
in partial tiles (rule per pair), at the kernel's tile and at tiles of one layout block of each strip
(``b / r`` rows), and the useful rate of the kept pairs (``useful_tflops``: GPU.md's FLOP count), beside plain
dilated's on all of its pairs and the rate a dilated + layout row's target asks. The plan build time (block masks) is reported for every case; so is whether the output and gradients are finite
(a row that is not never meets its target). JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from ring_blocksparse import BlockSparseRingDilatedAttention, Random, build_pattern, flex_backward
from ring_blocksparse.attention import dense_strip_kernel
from ring_blocksparse.batches import BATCH_ENV
from ring_blocksparse.fa4 import Fa4Blocks, fa4_backward, fa4_forward
from ring_blocksparse.flex import BLOCK_TILES_ENV, sparse_backward
from ring_blocksparse.strided import fa4_blocks, sparse_forward, strip_units
from ring_blocksparse.strip_ring import StripRingSchedule, build_strip_plan
from ring_core import create_attention
from ring_core.dilated import branches
from ring_core.engine import Accumulator
from ring_core.sharding import shard_positions
from ring_core.testing import relative_error
from tools import command_line
from tools.bench.timing import median_ms

# each row's ratio, against the baseline its section names
RATIOS = ("vs_plain_dilated", "vs_dense", "vs_flex", "vs_unpacked", "vs_eager", "vs_batched", "vs_block_tiles")


def band(density: float, seq_len: int, block: int) -> torch.Tensor:
    """Each query block's nearest key blocks (exactly ``density``, rows floor/ceil of ``density * nb``)."""
    nb = -(-seq_len // block)
    counts = Random(density).row_counts(nb).sort(descending=True).values
    start = torch.minimum((torch.arange(nb) - (counts - 1) // 2).clamp(min=0), nb - counts)
    j = torch.arange(nb)
    return ((j[None, :] >= start[:, None]) & (j[None, :] < (start + counts)[:, None]))[None]


def patterns(n: int, block: int) -> dict[str, torch.Tensor]:
    """Layouts near density 0.1 at ``n`` (the registered patterns with options chosen for it, and a band)."""
    nb = n // block
    window = max(1, round(0.1 * nb)) * block
    stride = 16 * block
    return {
        "band": band(0.1, n, block),
        "random": build_pattern("random", density=0.1, seed=0).layout(n, block),
        "local_window": build_pattern("local_window", window=window).layout(n, block),
        "local_window_sliding": build_pattern("local_window", window=window // 2 + block, sliding=True).layout(
            n, block
        ),
        "dilated_sparse": build_pattern("dilated_sparse", dilation=10).layout(n, block),
        "global_local": build_pattern("global_local", global_tokens=8 * block, window=18 * block).layout(n, block),
        "strided": build_pattern("strided", stride=stride).layout(n, block),
    }


def kept_pairs(plan) -> int:
    """Allowed (query, key) pairs over every call and head (exact when units lie in one segment)."""
    total = 0
    for calls in plan.calls.values():
        for call in calls:
            any_ = call.tiles.unit_any
            u = call.tiles.unit
            pairs = int(any_.sum()) * u * u
            if call.causal and call.rule.same_strip:
                pairs -= int(any_.diagonal(dim1=-2, dim2=-1).sum()) * u * (u - 1) // 2
            heads = len(range(*call.heads.indices(10**9)))
            total += pairs * (heads // any_.shape[0])
    return total


def visited_pairs(plan) -> tuple[int, int]:
    """(query, key) pairs in the tiles the kernels visit, over every call and head, and of those the pairs in partial
    tiles (where the rule is evaluated per pair)."""
    visited = partial = 0
    for calls in plan.calls.values():
        for call in calls:
            tiles = call.tiles
            heads = len(range(*call.heads.indices(10**9))) // tiles.full.shape[0]
            visited += int((tiles.full | tiles.partial).sum()) * tiles.tile**2 * heads
            partial += int(tiles.partial.sum()) * tiles.tile**2 * heads
    return visited, partial


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The shape of the measured attention: sequence, heads, head dim, block, the dilated branches."""
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--segments", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--rates", type=int, nargs="+", default=[1, 2, 4])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sparse-kernel", default="auto", choices=("auto", "flex"),
                        help="the strips' kernel: auto (flash-attn 4 where it can, when installed) or flex")  # fmt: skip
    parser.add_argument("--ring", type=int, default=4, help="ranks simulated for the ring's steps (0: skip)")
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="sections to skip: dilated patterns gather compiled packed packed-gather unbatched coarse ring "
        "ring-autograd (the ring again with the FlexAttention backward through autograd, when the operator is on)",
    )
    parser.add_argument("--time-budget", type=float, default=1e9, help="stop starting new rows after this (s)")
    parser.add_argument("--dilated-layouts", nargs="+", default=["band", "random"], choices=("band", "random"),
                        help="the layouts of the dilated section")  # fmt: skip
    parser.add_argument("--masks", nargs="+", default=["full", "causal"], choices=("full", "causal"),
                        help="the masks of the dilated, pattern and coarse rows")  # fmt: skip
    parser.add_argument("--packed-multiple", type=int, default=0,
                        help="packed documents' lengths are multiples of this (0: of every rate; 1: any length)")  # fmt: skip
    parser.add_argument("--json", default="bench-results/blocksparse-strips.json")
    parser.add_argument("--plot", default="bench-results/blocksparse-strips.png")
    parser.add_argument("--replot", metavar="JSON")
    args = parser.parse_args(argv)
    if args.replot:
        plot(args.plot, json.loads(Path(args.replot).read_text()))
        return 0
    started = time.perf_counter()
    device, dtype = torch.device("cuda"), torch.bfloat16
    n, h, d, block = args.seq_len, args.heads, args.head_dim, args.block_size
    segments, rates = args.segments, args.rates
    card = torch.cuda.get_device_name(device)
    record = {
        "title": f"{card}, bf16, B=1 N={n} H={h} D={d}, block {block}, fwd+bwd",
        "card": card,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "args": vars(args),
        "timing": "CUDA events, median of --repeats after a warm-up; fwd+bwd = autograd.grad(out, (q, k, v), dout)",
        # which backward the FlexAttention calls take (RING_BLOCKSPARSE_FLEX_BACKWARD: the operator alone, or autograd)
        "flex_backward_operator": flex_backward.available(torch.empty(0, device=device)),
        "baselines": {},
        "results": [],
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        path.write_text(json.dumps(record, indent=2))

    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(1, n, h, d, device=device, dtype=dtype, generator=generator) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()

    def useful_tflops(pairs: int, ms: float) -> float:
        """The rate of ``pairs`` (query, key) pairs in ``ms`` by GPU.md's count (forward 4 flops per pair and head
        dim, fwd+bwd 3.5x that)."""
        return 14 * pairs * d / ms / 1e9

    def fwd_bwd(module, causal, **options):
        return lambda: torch.autograd.grad(module(q, k, v, is_causal=causal, **options), (q, k, v), dout)

    def sdpa(q_, k_, v_, is_causal):
        return F.scaled_dot_product_attention(
            q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), is_causal=is_causal
        ).transpose(1, 2)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    for causal in (False, True):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = median_ms(fwd_bwd(sdpa, causal), repeats=args.repeats)
        plain = create_attention("ring_dilated_flash", segment_lengths=segments, dilation_rates=rates)
        dilated = median_ms(fwd_bwd(plain, causal), repeats=args.repeats)
        label = mask_name(causal)
        record["baselines"][label] = {"dense_sdpa_cudnn_ms": dense, "plain_dilated_ms": dilated}
        print(f"baselines ({label}): dense SDPA cuDNN {dense:.2f} ms, plain dilated {dilated:.2f} ms", flush=True)
    save()

    modules: dict = {}

    def agreement(a, b, causal: bool) -> dict:
        """bf16 relative differences of out and each gradient between two modules on the same inputs."""
        results = []
        for module in (a, b):
            out = module(q, k, v, is_causal=causal)
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))
        return {name: relative_error(x, y) for name, x, y in zip(("out", "dq", "dk", "dv"), *results)}

    def row(
        section: str, name: str, causal: bool, segs, rts, layout, method="flex", documents=None, compiled=False
    ) -> dict | None:
        if time.perf_counter() - started > args.time_budget:
            print(f"time budget reached: skipping {section} {name}")
            return None
        entry = {"section": section, "name": name, "causal": causal, "method": method, "compiled": compiled,
                 "segments": list(segs), "rates": list(rts)}  # fmt: skip
        options = {}
        if documents is not None:
            entry["documents"] = len(documents) - 1
            options["cu_seqlens"] = torch.tensor(documents, dtype=torch.int32, device=device)
        if layout is not None:
            entry["density"] = layout.float().mean().item()
        try:
            attn = BlockSparseRingDilatedAttention(segs, rts, block_size=block, block_layout=layout, method=method)
            attn.sparse_kernel = args.sparse_kernel
            call = torch.compile(attn, fullgraph=True) if compiled else attn
            t0 = time.perf_counter()
            if method == "flex":
                plan_options = dict(
                    seq_len=n, rank=0, world_size=1, layout_kind="contiguous", q=q, num_heads=h, num_kv_heads=h,
                    branch_list=branches(segs, rts, "lse", h), block_size=block, layout=layout, causal=causal,
                    documents=documents is not None,
                )  # fmt: skip
                plan = build_strip_plan(**plan_options)
                torch.cuda.synchronize()
                entry["plan_build_s"] = time.perf_counter() - t0
                if documents is None:  # (a plan for documents ignores segments: its pairs are a superset)
                    entry["kept_pairs"] = kept_pairs(plan)
                    entry["visited_pairs"], entry["partial_pairs"] = visited_pairs(plan)
                    # the same plan with tiles of one layout block of each strip (b / r rows), as off CUDA
                    fine = build_strip_plan(**dict(plan_options, q=torch.zeros(()).expand(q.shape), masks=False))
                    entry["visited_pairs_block_tiles"], entry["partial_pairs_block_tiles"] = visited_pairs(fine)
                entry["dense_strips"] = sum(c.run is not None for c in plan.calls[0])
                entry["flex_calls"] = sum(c.run is None for c in plan.calls[0])
            t0 = time.perf_counter()
            out = call(q, k, v, is_causal=causal, **options)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
            entry["first_call_s"] = time.perf_counter() - t0
            entry["finite"] = all(
                bool(t.isfinite().all()) for t in (out, *grads)
            )  # a NaN row's time counts for nothing
            del out, grads
            entry["fwd_ms"] = median_ms(lambda: call(q, k, v, is_causal=causal, **options), repeats=args.repeats)
            entry["fwd_bwd_ms"] = median_ms(
                fwd_bwd(call, causal, **options), repeats=args.repeats if method == "flex" else 3
            )
            entry["method_used"] = attn.last_method
            if "kept_pairs" in entry:
                entry["useful_tflops"] = useful_tflops(entry["kept_pairs"], entry["fwd_bwd_ms"])
            if attn.last_method == "flex":
                entry["flash_attn4_calls"] = sum(isinstance(c.fa4, Fa4Blocks) for c in attn.last_plan.calls[0])
            modules[section, name, causal] = attn
        except Exception as exc:  # report, keep the rest
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            print(f"{section} {name}: {entry['error']}", flush=True)
        record["results"].append(entry)
        save()
        return entry

    def finish(entry, ratio_name: str, baseline: float, target: float | None) -> None:
        if entry is None or "error" in entry:
            return
        entry[ratio_name] = entry["fwd_bwd_ms"] / baseline
        if target is not None:
            entry["target"] = target
            entry["met"] = entry[ratio_name] <= target and entry.get("finite", True)
        save()
        print(
            f"{entry['section']:8s} {entry['name']:22s} {'causal' if entry['causal'] else 'full':6s} "
            f"fwd {entry['fwd_ms']:7.2f} fwd+bwd {entry['fwd_bwd_ms']:7.2f} ms  {ratio_name} {entry[ratio_name]:.3f}"
            + (f" (target {target:.3f})" if target is not None else "")
            + f"  plan {entry.get('plan_build_s', float('nan')):.2f} s, first call {entry['first_call_s']:.1f} s",
            flush=True,
        )

    layouts = patterns(n, block)
    # most telling first (a run cut short by --time-budget keeps them): the non-causal rows that compile
    # each strip shape, then causal rows and the other patterns (same kernels, no new compile)
    tasks = [("dilated", "band", False), ("pattern", "random", False), ("dilated", "random", False)]
    tasks += [("pattern", "band", False), ("pattern", "local_window", False)]
    tasks += [("dilated", name, True) for name in ("band", "random")]
    tasks += [("pattern", name, True) for name in ("random", "band")]
    tasks += [("pattern", name, False) for name in layouts if name not in ("random", "band", "local_window")]
    plain_rows: dict = {}
    for section, name, causal in tasks:
        if (section == "pattern" and "patterns" in args.skip) or section in args.skip:
            continue
        if (section == "dilated" and name not in args.dilated_layouts) or mask_name(causal) not in args.masks:
            continue
        base = record["baselines"][mask_name(causal)]
        if section == "pattern":
            entry = row("pattern", name, causal, [n], [1], layouts[name])
            if entry is not None and "density" in entry:
                finish(entry, "vs_dense", base["dense_sdpa_cudnn_ms"], 0.12 * max(1.0, entry["density"] / 0.1))
            continue
        if causal not in plain_rows:  # the branches without a layout: the pairs a layout keeps are counted against it
            none = plain_rows[causal] = row("dilated", "no layout", causal, segments, rates, None)
            finish(none, "vs_plain_dilated", base["plain_dilated_ms"], 1.15)
            if none is not None and "error" not in none:
                plain = create_attention("ring_dilated_flash", segment_lengths=segments, dilation_rates=rates)
                none["rel_diff_vs_plain_dilated"] = agreement(modules["dilated", "no layout", causal], plain, causal)
                save()
        none = plain_rows[causal]
        entry = row("dilated", name, causal, segments, rates, layouts[name])
        if entry is not None and "kept_pairs" in entry and none is not None and "kept_pairs" in none:
            entry["kept"] = entry["kept_pairs"] / none["kept_pairs"]
            finish(entry, "vs_plain_dilated", base["plain_dilated_ms"], entry["kept"] * 1.15)
            # the useful rate the target asks of the layout's pairs, against plain dilated's on all of them
            target_ms = base["plain_dilated_ms"] * entry["kept"] * 1.15
            entry["useful_tflops_target"] = useful_tflops(entry["kept_pairs"], target_ms)
            entry["plain_dilated_useful_tflops"] = useful_tflops(none["kept_pairs"], base["plain_dilated_ms"])
    if "gather" not in args.skip:
        flex = next((r for r in record["results"] if r["section"] == "dilated" and r["name"] == "band"
                     and not r["causal"] and "error" not in r), None)  # fmt: skip
        entry = row("gather", "band", False, segments, rates, layouts["band"], method="gather")
        if flex is not None:
            finish(entry, "vs_flex", flex["fwd_bwd_ms"], 1.2)
            if entry is not None and "error" not in entry:
                pair = modules["gather", "band", False], modules["dilated", "band", False]
                entry["rel_diff_vs_flex"] = agreement(*pair, False)
                save()
    if "compiled" not in args.skip:  # torch.compile(fullgraph=True): the strips as one op, backward recomputing
        for causal in (False, True):
            eager = next((r for r in record["results"] if r["section"] == "dilated" and r["name"] == "band"
                          and r["causal"] == causal and "error" not in r), None)  # fmt: skip
            entry = row("compiled", "band", causal, segments, rates, layouts["band"], compiled=True)
            if eager is not None:
                finish(entry, "vs_eager", eager["fwd_bwd_ms"], 1.2)
    if "packed" not in args.skip:
        packed_rows(args, row, finish, record, save, layouts["band"])
    if "unbatched" not in args.skip:
        unbatched_rows(row, finish, record, layouts["band"], segments, rates)
    if "coarse" not in args.skip:
        coarse_rows(row, finish, record, layouts["random"], segments, rates)  # (the masks measured above)
    if args.ring and "ring" not in args.skip and time.perf_counter() - started < args.time_budget:
        record["ring"] = simulate_ring(args, q, k, v, dout, layouts["random"], save, record)
        if record["flex_backward_operator"] and "ring-autograd" not in args.skip:
            # the same ring with the steps' FlexAttention backward through autograd (each call's forward again)
            with mock.patch.dict(os.environ, {flex_backward.FLEX_BACKWARD_ENV: "0"}):
                record["ring_autograd"] = simulate_ring(args, q, k, v, dout, layouts["random"], save, record)
            ratio = record["ring"]["steps_total_ms"] / record["ring_autograd"]["steps_total_ms"]
            record["ring"]["vs_autograd_backward"] = ratio
            print(f"ring steps with the backward operator: {ratio:.3f} of the autograd backward's", flush=True)
        save()
    if args.plot:
        try:
            plot(args.plot, record)
        except ImportError:
            print("matplotlib is missing: draw the plot elsewhere with --replot")
    print(f"\n{record['title']}; baselines {json.dumps(record['baselines'])}")
    print(
        f"{'section':8s} {'case':22s} {'causal':6s} {'density':>7s} {'fwd+bwd':>8s} {'ratio':>14s} {'target':>7s} met"
    )
    for r in record["results"]:
        ratio = next((key for key in RATIOS if key in r), None)
        if "error" in r or ratio is None:
            print(f"{r['section']:8s} {r['name']:22s} ERROR {r.get('error', 'no ratio')[:60]}")
            continue
        print(
            f"{r['section']:8s} {r['name']:22s} {r['causal']!s:6s} {r.get('density', 1.0):7.4f} "
            f"{r['fwd_bwd_ms']:8.2f} {ratio[3:]:>7s} {r[ratio]:6.3f} {r.get('target', float('nan')):7.3f} {r.get('met')}"
            + ("" if r.get("finite", True) else "  NOT FINITE")
        )
    if "ring" in record:
        ring = record["ring"]
        print(f"ring x{ring['world_size']} (simulated): {json.dumps({k: ring[k] for k in ring if k != 'ranks'})}")
    return 0


def packed_documents(n: int, multiple: int, seed: int = 0) -> list[int]:
    """``cu_seqlens`` of documents of 512-4096 tokens, each a multiple of ``multiple``, filling ``n``."""
    generator = torch.Generator().manual_seed(seed)
    bounds = [0]
    while bounds[-1] < n:
        length = int(torch.randint(512 // multiple, 4096 // multiple + 1, (1,), generator=generator)) * multiple
        bounds.append(min(n, bounds[-1] + length))
    return bounds


def packed_rows(args, row, finish, record, save, layout) -> None:
    """Packed documents, band layout and the dilated branches, causal: strips vs gather, compiled strips and unpacked
    strips."""
    n, segments, rates = args.seq_len, args.segments, args.rates
    multiple = args.packed_multiple or math.lcm(*rates)
    documents = packed_documents(n, multiple)
    record["packed_documents"] = documents
    unpacked = next((r for r in record["results"] if r["section"] == "dilated" and r["name"] == "band"
                     and r["causal"] and "error" not in r), None)  # fmt: skip
    strips = row("packed", "band", True, segments, rates, layout, documents=documents)
    if unpacked is not None:
        finish(strips, "vs_unpacked", unpacked["fwd_bwd_ms"], None)
    gather = None
    if "packed-gather" not in args.skip:  # (seconds per call: the row to leave out of a quick run)
        gather = row("packed", "band", True, segments, rates, layout, method="gather", documents=documents)
    compiled = row("packed", "band compiled", True, segments, rates, layout, documents=documents, compiled=True)
    if strips is not None and "error" not in strips:
        finish(gather, "vs_flex", strips["fwd_bwd_ms"], 1.2)
        finish(compiled, "vs_eager", strips["fwd_bwd_ms"], 1.2)
    save()


def mask_name(causal: bool) -> str:
    return "causal" if causal else "full"


def coarse_rows(row, finish, record, layout, segments, rates) -> None:
    """The random + dilated rows measured above (full, causal) again with every CUDA call at 128-row tiles."""
    with mock.patch.dict(os.environ, {BLOCK_TILES_ENV: "0"}):  # (the caller's setting, if any, comes back after)
        for causal in (False, True):
            fine = next((r for r in record["results"] if (r["section"], r["name"], r["causal"]) == ("dilated", "random",
                         causal) and "error" not in r), None)  # fmt: skip
            if fine is not None:
                entry = row("128-row tiles", "dilated random", causal, segments, rates, layout)
                finish(entry, "vs_block_tiles", fine["fwd_bwd_ms"], None)


def unbatched_rows(row, finish, record, layout, segments, rates) -> None:
    """The band + dilated rows measured above (full, causal, packed) again with every strip call alone."""
    documents = record.get("packed_documents")
    with mock.patch.dict(os.environ, {BATCH_ENV: "0"}):  # (the caller's setting, if any, comes back after)
        for section, name, causal in (("dilated", "band", False), ("dilated", "band", True), ("packed", "band", True)):
            batched = next((r for r in record["results"] if (r["section"], r["name"], r["causal"]) == (section, name, causal)
                            and not r["compiled"] and r["method"] == "flex" and "error" not in r), None)  # fmt: skip
            if batched is None:
                continue
            packed = documents if section == "packed" else None
            entry = row("unbatched", f"{section} {name}", causal, segments, rates, layout, documents=packed)
            finish(entry, "vs_batched", batched["fwd_bwd_ms"], None)


def simulate_ring(args, q, k, v, dout, layout, save, record) -> dict:
    """Each rank's steps of the sparse ring on one GPU, fed the rows its plan receives; vs the one-GPU run."""
    n, block, world = args.seq_len, args.block_size, args.ring
    segs, rts = [n], [1]
    causal = False
    kernel = dense_strip_kernel(q, causal, q.shape[-1] ** -0.5, None)
    one = BlockSparseRingDilatedAttention(segs, rts, block_size=block, block_layout=layout, method="flex")
    one.sparse_kernel = args.sparse_kernel
    one_ms = median_ms(lambda: torch.autograd.grad(one(q, k, v), (q, k, v), dout), repeats=args.repeats)
    out1 = one(q, k, v)
    grads1 = torch.autograd.grad(out1, (q, k, v), dout)
    result = {"world_size": world, "layout": "contiguous", "pattern": "random", "density": layout.float().mean().item(),
              "causal": causal, "one_gpu_ms": one_ms, "ranks": []}  # fmt: skip
    shards, local = ring_shards((q, k, v, dout), world)
    outs, grads = [], [torch.zeros_like(x, dtype=torch.float32) for x in (q, k, v)]
    total = kernels = 0.0
    for rank in range(world):
        t0 = time.perf_counter()
        run = ring_rank(local, rank, layout, kernel, block=block, sparse=args.sparse_kernel)
        _, plan, _, _, received, state = run
        build_s = time.perf_counter() - t0
        fwd_ms = median_ms(lambda run=run: rank_steps(*run, backward=False), repeats=args.repeats)
        both_ms = median_ms(lambda run=run: rank_steps(*run, backward=True), repeats=args.repeats)
        total += both_ms
        kernels_ms = median_ms(kernels_alone(*run), repeats=args.repeats)
        kernels += kernels_ms
        outs.append(state["out"])
        grads[0][:, shards[rank]] += state["dq"]
        grads[1][:, shards[rank]] += state["dk"]
        grads[2][:, shards[rank]] += state["dv"]
        for s, (rows, dkr, dvr) in state["remote"].items():
            grads[1][:, shards[s][rows]] += dkr
            grads[2][:, shards[s][rows]] += dvr
        result["ranks"].append({"rank": rank, "plan_build_s": build_s, "fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms,
                                "kernels_ms": kernels_ms, "received_rows": {s: int(plan.recv_rows[s].numel()) for s in received}})  # fmt: skip
        print(
            f"ring rank {rank}: steps fwd {fwd_ms:.2f} ms, fwd+bwd {both_ms:.2f} ms (kernels alone {kernels_ms:.2f}), "
            f"plan {build_s:.2f} s",
            flush=True,
        )
        save()
    out = torch.cat(outs, 1)
    result["steps_total_ms"] = total
    result["vs_one_gpu"] = total / one_ms
    result["target"] = 1.1
    result["met"] = result["vs_one_gpu"] <= 1.1
    # the same split into steps with nothing around the kernels: what the split itself costs, and what the steps add
    result["kernels_total_ms"] = kernels
    result["kernels_vs_one_gpu"] = kernels / one_ms
    result["vs_kernels"] = total / kernels
    result["rel_diff_vs_one_gpu"] = {
        "out": relative_error(out, out1),
        **{f"d{name}": relative_error(g, g1) for name, g, g1 in zip("qkv", grads, grads1)},
    }
    print(
        f"ring total {total:.2f} ms vs one GPU {one_ms:.2f} ms: {result['vs_one_gpu']:.3f}; the steps' kernels alone "
        f"{kernels:.2f} ms ({result['kernels_vs_one_gpu']:.3f} of one GPU; the steps {result['vs_kernels']:.3f} of them)",
        flush=True,
    )
    return result


def ring_shards(tensors: tuple[torch.Tensor, ...], world: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Each rank's rows of ``(1, N, ...)`` tensors (contiguous layout) and the tensors' shards, per rank."""
    n = tensors[0].shape[1]
    shards = [shard_positions(n, r, world, "contiguous").to(tensors[0].device) for r in range(world)]
    return shards, [[x.detach()[:, rows] for x in tensors] for rows in shards]


def ring_rank(local: list[list[torch.Tensor]], rank: int, layout, kernel, *, block: int, sparse: str) -> tuple:
    """Rank ``rank`` of a sparse ring over the shards ``local`` (:func:`ring_shards` of q, k, v, dout; one rate-1
    branch over the whole sequence, not causal) on one GPU: ``(schedule, plan, rank, its shards, the rows it receives,
    state)`` as :func:`rank_steps` and :func:`kernels_alone` take them (the plan built here, ``state`` empty)."""
    world, q, k = len(local), local[rank][0], local[rank][1]
    n, h = q.shape[1] * world, q.shape[2]
    plan = build_strip_plan(
        seq_len=n, rank=rank, world_size=world, layout_kind="contiguous", q=q, num_heads=h, num_kv_heads=k.shape[2],
        branch_list=branches([n], [1], "lse", h), block_size=block, layout=layout, causal=False,
    )  # fmt: skip
    # the rows as the ring receives them: K and V views of one K|V buffer
    received = {s: torch.cat([local[s][1], local[s][2]], -1).index_select(1, plan.recv_rows[s]).split(
                [local[s][1].shape[-1], local[s][2].shape[-1]], -1) for s in range(world) if s != rank}  # fmt: skip
    return StripRingSchedule(plan, kernel, sparse=sparse), plan, rank, local[rank], received, {}


def kernels_alone(schedule, plan, rank: int, local, received: dict, state: dict):
    """The same tiles as :func:`rank_steps`, split into the same steps, kernels alone: each step's calls forward and
    backward (under the final ``out``/``lse`` of ``state``), as one GPU would run them; nothing merged, accumulated
    or placed (a source's rows are placed once, here, outside the timed step)."""
    ql, kl, vl, dl = local
    out, lse = state["out"], state["lse"]
    scale = schedule.kernel.scale
    inputs = {rank: (kl, vl)}
    for s in received:
        shard = schedule.shard_buffers(kl, vl) if not plan.whole[s] else None
        inputs[s] = schedule.place(s, *received[s], None, shard)[:2]

    def step() -> None:
        for s, (kb, vb) in inputs.items():
            for call in strip_units(schedule.run, plan.calls[s], ql):  # (as the steps run them: batches too)
                blocks = fa4_blocks(schedule.run, call, ql)
                if blocks is not None:
                    fa4_forward(call, blocks, ql, kb, vb, scale=scale)
                    fa4_backward(call, blocks, ql, kb, vb, out, lse, dl, scale=scale)
                else:
                    o, lse_call, leaves = sparse_forward(schedule.run, call, ql, kb, vb, grad=True, cut=None)
                    sparse_backward(call, o, lse_call, leaves, dl, out, lse)

    return step


def rank_steps(schedule, plan, rank: int, local, received: dict, state: dict, *, backward: bool) -> None:
    """One rank's ring steps (forward, then with ``backward`` the backward's), each source's received rows as
    :class:`StripRingSchedule` takes them (``place``, ``forward_step``, ``remote_backward_step``); results in
    ``state``."""
    ql, kl, vl, dl = local
    acc = Accumulator(ql, vl.shape[-1])
    shard = schedule.shard_buffers(kl, vl) if schedule.needs_shard() else None
    for s in range(plan.world_size):
        kb, vb, _ = (kl, vl, None) if s == rank else schedule.place(s, *received[s], None, shard)
        schedule.forward_step(ql, plan.calls[s], kb, vb, acc)
    out, lse = acc.out.to(ql.dtype), acc.lse
    state.update(out=out, lse=lse)
    if not backward:
        return
    grad_dtype = acc.lse.dtype  # the engine's accumulation dtype
    dq = torch.zeros_like(ql, dtype=grad_dtype)
    dk, dv = (torch.zeros_like(x, dtype=grad_dtype) for x in (kl, vl))
    state.update(dq=dq, dk=dk, dv=dv, remote={})
    d = kl.shape[-1]
    for s in range(plan.world_size):
        if s == rank:
            schedule.backward_step(ql, plan.calls[s], kl, vl, out, lse, dl, dq, dk, dv)
            continue
        kr, vr = received[s]
        dkv = schedule.grad_buffer(s, kr, vr, dk)  # the send buffer, as the ring's backward takes it
        schedule.remote_backward_step(s, ql, kr, vr, None, shard, out, lse, dl, dq, dkv)
        state["remote"][s] = (plan.recv_rows[s], dkv[..., :d], dkv[..., d:])


def plot(path: str, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["results"] if "error" not in r and "target" in r]
    labels, ratios, targets = [], [], []
    for r in rows:
        key = next(key for key in RATIOS if key in r)
        labels.append(f"{r['section']}: {r['name']}{' causal' if r['causal'] else ''} ({key[3:]})")
        ratios.append(r[key])
        targets.append(r["target"])
    if "ring" in record:
        labels.append(f"ring x{record['ring']['world_size']} steps (one_gpu)")
        ratios.append(record["ring"]["vs_one_gpu"])
        targets.append(record["ring"]["target"])
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(labels) + 1.5))
    y = range(len(labels))
    ax.barh(list(y), ratios, color=["tab:green" if r <= t else "tab:red" for r, t in zip(ratios, targets)])
    ax.scatter(targets, list(y), marker="|", s=200, color="black", label="target")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("fwd+bwd time / baseline of the same run (dense SDPA cuDNN, plain dilated, the eager strips)")
    ax.set_title(record["title"], fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
