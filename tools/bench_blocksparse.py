"""Block-sparse attention: time vs density against dense SDPA (cuDNN), in one run.

    python tools/bench_blocksparse.py --check --json bench-results/blocksparse.json --plot bench-results/blocksparse.png

For each pattern (``random``: blocks drawn with a probability; ``local``: a sliding band
of key blocks) and each density, times forward and forward+backward (CUDA events) of
``BlockSparseRingDilatedAttention`` on one device (``segment_lengths=[N]``,
``dilation_rates=[1]``: pure block sparsity) with:

- ``flex``: ``method="flex"``, one compiled FlexAttention kernel on a BlockMask built
  from the layout (what ``method="auto"`` picks on CUDA);
- ``gather``: ``method="gather"``, allowed key tiles gathered into dense blocks for the
  registry's kernel (cuDNN on Hopper), backward batched by key tile (what the ring uses);
- ``gather-bwd-by-query``: the same with the backward batched like the forward.

The baseline is dense ``scaled_dot_product_attention`` forced to the cuDNN backend on the
same shapes and causality, measured in the same run; ratios are ``time / dense time``.
The target density comes first (both methods, and flex causal), then the curve, until
``--time-budget`` seconds. ``--check`` first verifies bf16 outputs and gradients of the
gather path against the float64 reference on a small dilated + per-head-random + causal
case. JSON is rewritten after every measurement, so a run cut short keeps what it
measured; ``--replot`` redraws the plot from it where matplotlib is installed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ring_blocksparse import BlockSparseRingDilatedAttention, build_pattern
from ring_core.testing import relative_error

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def pattern_for(kind: str, density: float, seq_len: int, block: int, seed: int):
    """A pattern of about ``density`` block density: ``random`` or a sliding ``local`` band."""
    if kind == "random":
        return build_pattern("random", density=density, seed=seed)
    nb = -(-seq_len // block)
    half = max(1, round((density * nb + 1) / 2))  # a band of 2*half - 1 blocks
    return build_pattern("local_window", window=half * block, sliding=True)


def check_small(device: torch.device, dtype: torch.dtype) -> dict:
    """bf16 vs the float64 reference: dilated branches, per-head random layout, causal, GQA."""
    from ring_core import reference_attention

    n, h, hkv, d, block = 2048, 4, 2, 128, 128
    config = {"segment_lengths": [512, 2048], "dilation_rates": [1, 2]}
    attn = BlockSparseRingDilatedAttention(
        **config, block_size=block, pattern="random", density=0.3, seed=1, per_head=True
    )
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, n, h, d, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(1, n, hkv, d, generator=generator, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, n, h, d, generator=generator, dtype=torch.float64)
    leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    out = attn(*leaves, is_causal=True)
    out.backward(dout.to(device, dtype))
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(
        *ref_leaves, **config, is_causal=True, block_layout=attn.layout_for(n, h), block_size=block
    )
    ref.backward(dout)
    errors = {"out": relative_error(out, ref)}
    for name, leaf, ref_leaf in zip(("dq", "dk", "dv"), leaves, ref_leaves):
        errors[name] = relative_error(leaf.grad, ref_leaf.grad)
    kernels = sorted({g.category for gs in attn.last_plan.groups.values() for g in gs})
    passed = errors["out"] <= 1e-2 and all(errors[g] <= 2e-2 for g in ("dq", "dk", "dv"))
    return {"errors": errors, "passed": passed, "categories": kernels}


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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target-density", type=float, default=0.1, help="measured first, every method")
    parser.add_argument("--check", action="store_true", help="first check bf16 accuracy on a small case")
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
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    b, n, h, d, block = args.batch, args.seq_len, args.heads, args.head_dim, args.block_size
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    title = f"{card}, {args.dtype}, B={b} N={n} H={h} D={d}, block {block}; ratios vs dense SDPA cuDNN (same causality)"
    record = {
        "title": title,
        "card": card,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python tools/bench_blocksparse.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": vars(args),
        "results": [],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        Path(args.json).write_text(json.dumps(record, indent=2))

    if args.check:
        record["check"] = check_small(device, dtype)
        print("accuracy check (bf16 vs float64 reference):", record["check"])
        save()
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (torch.randn(b, n, h, d, device=device, dtype=dtype, generator=generator) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()

    def sdpa(causal: bool):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2)

    flops = 4 * b * h * n * n * d
    record["dense"] = {}
    for causal in (False, True):
        backend = None
        if device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = sdpa_kernel(SDPBackend.CUDNN_ATTENTION)
            backend.__enter__()
        fwd = timed(lambda causal=causal: sdpa(causal), args.repeats, device)
        both = timed(lambda causal=causal: sdpa(causal).backward(dout), args.repeats, device)
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
        print(f"dense SDPA cuDNN ({label}): fwd {fwd:.1f} ms, fwd+bwd {both:.1f} ms")
    save()
    # (method, pattern, density, causal) in priority order: the target density first, then the curve
    methods = ["flex", "gather"]
    target = args.target_density
    others = [x for x in args.densities if x != target]
    tasks = [(m, kind, target, False) for m in methods for kind in args.patterns]
    tasks += [("flex", kind, target, True) for kind in args.patterns]
    tasks += [("flex", kind, x, False) for x in others for kind in args.patterns]
    tasks += [("gather-bwd-by-query", args.patterns[0], target, False)]
    tasks += [("gather", kind, x, False) for x in others for kind in args.patterns]
    for method, kind, density, causal in tasks:
        if time.perf_counter() - started > args.time_budget:
            print(f"time budget reached; skipping {method} {kind} {density}{' causal' if causal else ''}")
            continue
        pattern = pattern_for(kind, density, n, block, 0)
        layout = pattern.layout(n, block, h)
        actual = layout.float().mean().item()
        row = {"method": method, "pattern": kind, "causal": causal, "target_density": density, "density": actual}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            attn = BlockSparseRingDilatedAttention(
                [n], [1], block_size=block, pattern=pattern, transposed_backward=method != "gather-bwd-by-query",
                method="flex" if method == "flex" else "gather",
            )  # fmt: skip
            t0 = time.perf_counter()
            attn(q, k, v, is_causal=causal).backward(dout)  # builds the plan / block mask, compiles, warms up
            row["first_call_s"] = time.perf_counter() - t0
            row["fwd_ms"] = timed(
                lambda attn=attn, causal=causal: attn(q, k, v, is_causal=causal), args.repeats, device
            )
            row["fwd_bwd_ms"] = timed(
                lambda attn=attn, causal=causal: attn(q, k, v, is_causal=causal).backward(dout), args.repeats, device
            )
            if attn.last_plan is not None:
                row["kernel_calls_fwd"] = sum(len(g) for g in attn.last_plan.groups.values())
            del attn
        except Exception as exc:  # report, keep the rest
            row["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{method} {kind} {density}: {row['error']}")
            record["results"].append(row)
            save()
            continue
        dense = record["dense"]["causal" if causal else "full"]
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        row["ratio_fwd"] = row["fwd_ms"] / dense["fwd_ms"]
        row["ratio_fwd_bwd"] = row["fwd_bwd_ms"] / dense["fwd_bwd_ms"]
        row["useful_tflops_fwd_bwd"] = 3.5 * flops * actual / (2 if causal else 1) / row["fwd_bwd_ms"] / 1e9
        record["results"].append(row)
        print(
            f"{method:20s} {kind:6s} density {actual:.3f}{' causal' if causal else ''}: fwd {row['fwd_ms']:8.1f} ms "
            f"({row['ratio_fwd']:.3f}x)  fwd+bwd {row['fwd_bwd_ms']:8.1f} ms ({row['ratio_fwd_bwd']:.3f}x)  "
            f"{row['useful_tflops_fwd_bwd']:.0f} useful TFLOP/s  first call {row['first_call_s']:.1f} s, "
            f"peak {row['peak_gib']:.1f} GiB"
        )
        save()
    if args.plot and record["results"]:
        try:
            plot(args.plot, record)
            print(f"wrote {args.plot}")
        except ImportError:
            print(f"matplotlib is missing: draw it elsewhere with --replot {args.json} --plot {args.plot}")
    print(f"wrote {args.json}")
    # short table last
    print(f"\n{title}")
    print(f"{'method':20s} {'pattern':14s} {'density':>8s} {'fwd+bwd ms':>11s} {'vs dense':>9s}")
    for label, dense in record["dense"].items():
        print(f"{'sdpa-cudnn':20s} {'dense ' + label:14s} {1.0:8.3f} {dense['fwd_bwd_ms']:11.1f} {1.0:9.3f}")
    for r in sorted(record["results"], key=lambda r: (r["method"], r["causal"], r["pattern"], r["density"])):
        name = r["pattern"] + (" causal" if r["causal"] else "")
        if "error" in r:
            print(f"{r['method']:20s} {name:14s} {r['density']:8.3f} ERROR {r['error'][:60]}")
        else:
            print(f"{r['method']:20s} {name:14s} {r['density']:8.3f} {r['fwd_bwd_ms']:11.1f} {r['ratio_fwd_bwd']:9.3f}")
    return 0 if record.get("check", {}).get("passed", True) else 1


if __name__ == "__main__":
    sys.exit(main())
