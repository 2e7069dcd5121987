"""Block-sparse attention: time vs density against dense SDPA (cuDNN), in one run.

    python -m tools.bench.blocksparse --check --json bench-results/blocksparse.json --plot bench-results/blocksparse.png
    python -m tools.bench.blocksparse --sweep --json bench-results/blocksparse-sweep.json   # FlexAttention options
    python -m tools.bench.blocksparse --options-from bench-results/blocksparse-sweep.json ...  # use the best

Both patterns have exactly the density asked for (to within ``0.5 / nb^2``, ``nb = N / block``)
and the same number of key blocks in every query-block row (``floor`` or ``ceil`` of
``density * nb``): ``random`` is the exact-count ``random`` pattern (seed 0); ``local`` gives
each query block its nearest key blocks (a band centred on the diagonal, shifted inward at
the ends of the sequence). The realised density is reported with every row (and, causal,
the fraction of the causal triangle computed). Each is timed, forward and
forward+backward (CUDA events, median), through ``BlockSparseRingDilatedAttention`` on one
device (``segment_lengths=[N]``, ``dilation_rates=[1]``: pure block sparsity) with:

- ``flex``: ``method="flex"``, one compiled FlexAttention kernel on a BlockMask built
  from the layout (what ``method="auto"`` picks on CUDA), with its kernel options
  (the library's defaults, or ``--kernel-options`` / ``--options-from``);
- ``gather``: ``method="gather"``, allowed key tiles gathered into dense blocks for the
  registry's kernel (cuDNN on Hopper), backward batched by key tile (what the ring uses).

The baseline is dense ``scaled_dot_product_attention`` forced to the cuDNN backend on the
same shapes and causality, measured in the same run; ratios are ``time / dense time``.
Forward+backward is ``torch.autograd.grad(out, (q, k, v), dout)`` for every method and the
baseline alike (no accumulation into ``.grad``, which is not part of attention). The
target density comes first (flex both causalities, then gather), then the curve, until
``--time-budget`` seconds. ``--check`` first verifies bf16 outputs and gradients of the
gather path (dilated, per-head random, causal, GQA) and of the flex path (with the kernel
options used) against the float64 reference. ``--sweep`` instead times FlexAttention
kernel options at the target density (each candidate changes forward and backward tiles
at once; the forward time ranks forward options, forward+backward minus forward ranks the
backward's; one row per candidate and pattern in ``results``) and writes the best combination as
``best_options``. JSON is rewritten after
every measurement, so a run cut short keeps what it measured; ``--replot`` redraws the plot
from it where matplotlib is installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ring_blocksparse import BlockSparseRingDilatedAttention, Random, build_pattern
from ring_core.testing import relative_error
from tools.bench.timing import median_ms

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FWD = ("fwd_BLOCK_M", "fwd_BLOCK_N", "fwd_num_warps", "fwd_num_stages")
BWD = ("bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2", "bwd_num_warps", "bwd_num_stages")
NO_FLAGS = {"ROWS_GUARANTEED_SAFE": False, "BLOCKS_ARE_CONTIGUOUS": False}


def _tiles(fwd: tuple | None = None, bwd: tuple | None = None) -> dict:
    options = {}
    if fwd:
        options.update(zip(FWD, fwd))
    if bwd:
        options.update(zip(BWD, bwd))
    return options


# name -> kernel options tried by --sweep (Hopper, bf16, D=128; FlexAttention's own defaults there:
# forward 128x64 tiles, 8 warps, 3 stages; backward 64/128/128/64, 8 warps, 3 stages)
SWEEP = {
    "torch-default": dict(NO_FLAGS),
    "safe-flags": {},
    "f128x128s2-b64x128s2": _tiles((128, 128, 8, 2), (64, 128, 128, 64, 8, 2)),
    "f128x64s4-b64x64w4": _tiles((128, 64, 8, 4), (64, 64, 64, 64, 4, 3)),
    "f128x128s3-b32x128": _tiles((128, 128, 8, 3), (32, 128, 128, 32, 8, 3)),
    "prescale-qk": {"PRESCALE_QK": True},
    "tma": {"USE_TMA": True},
}


def layout_for(kind: str, density: float, seq_len: int, block: int, seed: int = 0) -> torch.Tensor:
    """A ``(1, nb, nb)`` layout of exactly ``density`` (rows: floor or ceil of ``density * nb`` blocks).

    ``random``: the exact-count ``random`` pattern. ``local``: each query block's nearest key
    blocks, a band centred on the diagonal, shifted inward at the ends of the sequence (the
    longer rows first, so each column's blocks are one run too: ``BLOCKS_ARE_CONTIGUOUS``).
    """
    pattern = build_pattern("random", density=density, seed=seed)
    nb = -(-seq_len // block)
    if kind == "random":
        return pattern.layout(seq_len, block)
    counts = Random(density).row_counts(nb).sort(descending=True).values  # monotone band edges
    start = (torch.arange(nb) - (counts - 1) // 2).clamp(min=0)
    start = torch.minimum(start, nb - counts)
    j = torch.arange(nb)
    return ((j[None, :] >= start[:, None]) & (j[None, :] < (start + counts)[:, None]))[None]


def causal_fraction(layout: torch.Tensor, seq_len: int, block: int) -> float:
    """The fraction of the causal triangle's (query, key) pairs that the layout allows."""
    nb = layout.shape[-1]
    below = torch.tril(layout[0].double(), diagonal=-1).sum().item() * block * block
    diagonal = layout[0].diagonal().double().sum().item() * block * (block + 1) / 2
    return (below + diagonal) / (seq_len * (seq_len + 1) / 2) if nb * block == seq_len else float("nan")


def _errors(out, leaves, ref, ref_leaves) -> dict:
    errors = {"out": relative_error(out, ref)}
    for name, leaf, ref_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        errors[name] = relative_error(leaf.grad, ref_leaf.grad)
    return errors


def check_small(device: torch.device, dtype: torch.dtype, kernel_options: dict | None) -> dict:
    """bf16 vs the float64 reference: gather (dilated branches, per-head random layout, causal, GQA)
    and flex (per-head random layout, causal, with ``kernel_options``)."""
    from ring_core import reference_attention

    result = {}
    n, h, hkv, d, block = 2048, 4, 2, 128, 128
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, h, d, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, n, hkv, d, generator=generator, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, n, h, d, generator=generator, dtype=torch.float64)
    cases = {
        "gather": ({"segment_lengths": [512, 2048], "dilation_rates": [1, 2]}, {"method": "gather"}),
        "flex": ({"segment_lengths": [2048], "dilation_rates": [1]}, {"method": "flex"}),
    }
    for label, (config, extra) in cases.items():
        if label == "flex":
            extra["flex_kernel_options"] = kernel_options
        attn = BlockSparseRingDilatedAttention(
            **config, block_size=block, pattern="random", density=0.3, seed=1, per_head=True, **extra
        )
        leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
        out = attn(*leaves, is_causal=True)
        out.backward(dout.to(device, dtype))
        ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(
            *ref_leaves, **config, is_causal=True, block_layout=attn.layout_for(n, h), block_size=block
        )
        ref.backward(dout)
        errors = _errors(out, leaves, ref, ref_leaves)
        passed = errors["out"] <= 1e-2 and all(errors[g] <= 2e-2 for g in ("dq", "dk", "dv"))
        result[label] = {"errors": errors, "passed": passed, "method": attn.last_method}
    result["passed"] = all(r["passed"] for r in result.values())
    return result


def plot(path: str, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    rows = [r for r in record["results"] if "error" not in r]
    for method, kind, causal in sorted({(r["method"], r["pattern"], r.get("causal", False)) for r in rows}):
        line = sorted(
            (r for r in rows if (r["method"], r["pattern"], r.get("causal", False)) == (method, kind, causal)),
            key=lambda r: r["density"],
        )
        style = ("s" if method == "flex" else "o") + (":" if causal else "-")
        label = f"{method}, {kind}{', causal' if causal else ''}"
        ax.plot([r["density"] for r in line], [r["ratio_fwd_bwd"] for r in line], style, label=label)
    ax.plot([0, 1], [0, 1], ":", color="grey", label="time = density x dense")
    ax.plot([0.1], [0.15], "r*", markersize=12, label="target: <= 0.15x at density 0.1")
    ax.set_xlabel("block density (fraction of allowed block pairs)")
    ax.set_ylabel("fwd+bwd time / dense SDPA cuDNN fwd+bwd (same run)")
    ax.set_title(record["title"], fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_options(sweep: list[dict]) -> dict:
    """Forward tiles of the candidate with the least forward time, backward tiles of the one with the least
    backward time (forward+backward minus forward), summed over patterns; flags on unless turning them
    off was faster; PRESCALE_QK / USE_TMA only where they beat the plain safe flags by over 1%."""
    ok = {}
    for row in sweep:
        if "error" not in row:
            ok.setdefault(row["candidate"], []).append(row)
    complete = {name: rows for name, rows in ok.items() if len(rows) == max(map(len, ok.values()))}

    def total(name: str, part: str) -> float:
        rows = complete[name]
        return sum(r["fwd_ms"] if part == "fwd" else r["fwd_bwd_ms"] - r["fwd_ms"] for r in rows)

    if not complete:
        return {}
    tiles = [name for name in complete if name not in ("prescale-qk", "tma")]
    options = {}
    fwd = min(tiles, key=lambda name: total(name, "fwd"))
    bwd = min(tiles, key=lambda name: total(name, "bwd"))
    options.update({k: v for k, v in SWEEP[fwd].items() if k.startswith("fwd_")})
    options.update({k: v for k, v in SWEEP[bwd].items() if k.startswith("bwd_")})
    both = {name: total(name, "fwd") + total(name, "bwd") for name in complete}
    if "torch-default" in both and "safe-flags" in both and both["torch-default"] < both["safe-flags"]:
        options.update(NO_FLAGS)
    for name in ("prescale-qk", "tma"):
        if name in both and "safe-flags" in both and both[name] < 0.99 * both["safe-flags"]:
            options.update(SWEEP[name])
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--densities", nargs="+", type=float, default=[0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--patterns", nargs="+", default=["local", "random"], choices=["local", "random"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--target-density", type=float, default=0.1, help="measured first, every method")
    parser.add_argument("--check", action="store_true", help="first check bf16 accuracy on a small case")
    parser.add_argument("--no-gather", action="store_true", help="time the flex path only")
    parser.add_argument("--sweep", action="store_true", help="time FlexAttention kernel options at the target")
    parser.add_argument(
        "--candidates", nargs="+", choices=list(SWEEP), help="--sweep only these (appended to an existing --json)"
    )
    parser.add_argument("--kernel-options", type=json.loads, help="FlexAttention kernel options (JSON dict)")
    parser.add_argument("--options-from", metavar="JSON", help="use best_options of a --sweep JSON")
    parser.add_argument("--time-budget", type=float, default=1e9, help="stop starting new measurements after this")
    parser.add_argument("--json", default="bench-results/blocksparse.json")
    parser.add_argument("--plot", default="bench-results/blocksparse.png")
    parser.add_argument("--replot", metavar="JSON", help="only redraw --plot from a saved JSON")
    args = parser.parse_args(argv)
    if args.replot:
        plot(args.plot, json.loads(Path(args.replot).read_text()))
        print(f"wrote {args.plot}")
        return 0
    started = time.perf_counter()
    # every kernel-options candidate and causality is one more compiled graph of flex_attention
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512
    kernel_options = args.kernel_options
    if args.options_from:
        kernel_options = json.loads(Path(args.options_from).read_text()).get("best_options") or None
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    b, n, h, d, block = args.batch, args.seq_len, args.heads, args.head_dim, args.block_size
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    title = f"{card}, {args.dtype}, B={b} N={n} H={h} D={d}, block {block}; ratios vs dense SDPA cuDNN (same causality)"
    record = {
        "title": title,
        "card": card,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python -m tools.bench.blocksparse", *(sys.argv[1:] if argv is None else argv)]),
        "args": vars(args),
        "kernel_options": kernel_options,
        "timing": "CUDA events, median of --repeats after one warm-up; fwd+bwd = autograd.grad(out, (q, k, v), dout)",
        "results": [],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        Path(args.json).write_text(json.dumps(record, indent=2))

    previous = json.loads(Path(args.json).read_text()) if args.sweep and Path(args.json).exists() else {}
    if previous.get("mode") == "sweep" and previous.get("dense"):  # --sweep --candidates ...: add to an earlier sweep
        record.update(results=previous["results"], dense=previous["dense"], commands=previous.get("commands", []))
        record["commands"].append(previous["command"])
    if args.check:
        record["check"] = check_small(device, dtype, kernel_options)
        print("accuracy check (bf16 vs float64 reference):", record["check"])
        save()
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(b, n, h, d, device=device, dtype=dtype, generator=generator) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()

    def fwd_bwd(out: torch.Tensor) -> None:
        torch.autograd.grad(out, (q, k, v), dout)

    def sdpa(causal: bool):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)

    flops = 4 * b * h * n * n * d
    for causal in () if "dense" in record else (False, True):
        record.setdefault("dense", {})
        backend = None
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
            backend.__enter__()
        fwd = median_ms(lambda causal=causal: sdpa(causal), repeats=args.repeats, device=device)
        both = median_ms(lambda causal=causal: fwd_bwd(sdpa(causal)), repeats=args.repeats, device=device)
        if backend is not None:
            backend.__exit__(None, None, None)
        useful = flops / (2 if causal else 1)
        label = "causal" if causal else "full"
        record["dense"][label] = {
            "fwd_ms": fwd,
            "fwd_bwd_ms": both,
            "tflops_fwd": useful / fwd / 1e9,
            "tflops_fwd_bwd": 3.5 * useful / both / 1e9,
        }
        print(f"dense SDPA cuDNN ({label}): fwd {fwd:.2f} ms, fwd+bwd {both:.2f} ms")
    save()

    def measure(method: str, kind: str, density: float, causal: bool, options: dict | None) -> dict:
        layout = layout_for(kind, density, n, block)
        actual = layout.float().mean().item()
        row = {"method": method, "pattern": kind, "causal": causal, "target_density": density, "density": actual}
        if causal:
            row["causal_fraction"] = causal_fraction(layout, n, block)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            attn = BlockSparseRingDilatedAttention(
                [n], [1], block_size=block, block_layout=layout, method=method,
                flex_kernel_options=options if method == "flex" else None,
            )  # fmt: skip
            t0 = time.perf_counter()
            fwd_bwd(attn(q, k, v, is_causal=causal))  # builds the plan / block mask, compiles, warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["first_call_s"] = time.perf_counter() - t0
            row["fwd_ms"] = median_ms(lambda: attn(q, k, v, is_causal=causal), repeats=args.repeats, device=device)
            row["fwd_bwd_ms"] = median_ms(
                lambda: fwd_bwd(attn(q, k, v, is_causal=causal)), repeats=args.repeats, device=device
            )
            if method == "gather":
                row["kernel_calls_fwd"] = sum(len(g) for g in attn.last_plan.groups.values())
            else:
                row["kernel_options"] = next((c.kernel_options for c in attn.last_plan.calls[0]), None)
        except Exception as exc:  # report, keep the rest
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            print(f"{method} {kind} {density}{' causal' if causal else ''}: {row['error'][:300]}")
            return row
        dense = record["dense"]["causal" if causal else "full"]
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        row["ratio_fwd"] = row["fwd_ms"] / dense["fwd_ms"]
        row["ratio_fwd_bwd"] = row["fwd_bwd_ms"] / dense["fwd_bwd_ms"]
        useful = flops * (row["causal_fraction"] / 2 if causal else actual)
        row["useful_tflops_fwd_bwd"] = 3.5 * useful / row["fwd_bwd_ms"] / 1e9
        print(
            f"{method:6s} {kind:6s} density {actual:.4f}{' causal' if causal else ''}: fwd {row['fwd_ms']:7.2f} ms "
            f"({row['ratio_fwd']:.3f}x)  fwd+bwd {row['fwd_bwd_ms']:7.2f} ms ({row['ratio_fwd_bwd']:.3f}x)  "
            f"{row['useful_tflops_fwd_bwd']:.0f} useful TFLOP/s  first call {row['first_call_s']:.1f} s"
        )
        return row

    target = args.target_density
    if args.sweep:
        record["mode"] = "sweep"  # results: one row per (candidate, pattern)
        for name in args.candidates or list(SWEEP):
            options = SWEEP[name]
            for kind in args.patterns:
                if time.perf_counter() - started > args.time_budget:
                    print(f"time budget reached; skipping {name} {kind}")
                    continue
                row = measure("flex", kind, target, False, options)
                row["candidate"] = name
                print(f"  ^ candidate {name}")
                record["results"].append(row)
                record["best_options"] = best_options(record["results"])
                save()
        print("best options:", record.get("best_options"))
        print(
            f"\n{title}\n{'candidate':24s} {'pattern':8s} {'fwd ms':>8s} {'bwd ms':>8s} {'fwd+bwd':>8s} {'ratio':>7s}"
        )
        for r in record["results"]:
            if "error" in r:
                print(f"{r['candidate']:24s} {r['pattern']:8s} ERROR {r['error'][:70]}")
            else:
                print(
                    f"{r['candidate']:24s} {r['pattern']:8s} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms'] - r['fwd_ms']:8.2f} "
                    f"{r['fwd_bwd_ms']:8.2f} {r['ratio_fwd_bwd']:7.4f}"
                )
        return 0

    # (method, pattern, density, causal) in priority order: the target density first, then the curve
    others = [x for x in args.densities if x != target]
    tasks = [("flex", kind, target, causal) for causal in (False, True) for kind in args.patterns]
    if not args.no_gather:
        tasks += [("gather", kind, target, False) for kind in args.patterns]
    tasks += [("flex", kind, x, False) for x in others for kind in args.patterns]
    tasks += [("flex", kind, x, True) for x in others for kind in args.patterns]
    for method, kind, density, causal in tasks:
        if time.perf_counter() - started > args.time_budget:
            print(f"time budget reached; skipping {method} {kind} {density}{' causal' if causal else ''}")
            continue
        record["results"].append(measure(method, kind, density, causal, kernel_options))
        save()
    if args.plot and record["results"]:
        try:
            plot(args.plot, record)
            print(f"wrote {args.plot}")
        except ImportError:
            print(f"matplotlib is missing: draw it elsewhere with --replot {args.json} --plot {args.plot}")
    print(f"wrote {args.json}")
    # short table last
    print(f"\n{title}\nkernel options: {kernel_options}")
    print(f"{'method':8s} {'pattern':14s} {'density':>8s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} {'vs dense':>9s}")
    for label, dense in record["dense"].items():
        print(
            f"{'cudnn':8s} {'dense ' + label:14s} {1.0:8.4f} {dense['fwd_ms']:8.2f} {dense['fwd_bwd_ms']:11.2f} {1:9.4f}"
        )
    for r in sorted(record["results"], key=lambda r: (r["method"], r["causal"], r["pattern"], r["density"])):
        name = r["pattern"] + (" causal" if r["causal"] else "")
        if "error" in r:
            print(f"{r['method']:8s} {name:14s} {r['density']:8.4f} ERROR {r['error'][:60]}")
        else:
            print(
                f"{r['method']:8s} {name:14s} {r['density']:8.4f} {r['fwd_ms']:8.2f} {r['fwd_bwd_ms']:11.2f} "
                f"{r['ratio_fwd_bwd']:9.4f}"
            )
    return 0 if record.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
