"""Kernel dispatch on one GPU: each row with every kernel forced, and with the default dispatch, in one run.

Rows (bf16, B=1, H=16, D=128, forward+backward, ``ring_dilated_flash``): dense N=16384 and
dilated N=65536 with segments [2048, 4096, 8192] and rates [1, 2, 4], causal and not. Columns:
``kernel=`` each of ``--kernels``, and ``dispatch`` (no kernel forced: ``tuned`` where the
card has a measured table). Target: ``dispatch`` at least as fast as the best forced kernel
of its row. Timing: steps back to back, median of repeats, all columns measured twice in
mirrored order; the mean of the two is reported next to both.

    python -m tools.bench.flash_dispatch --out dispatch.json --plot dispatch.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys

import torch

import ring_core
from ring_flash import RingDilatedAttentionFlash, TunedKernel
from tools import command_line
from tools.bench.timing import median_ms

ROWS = (
    ("dense N=16384", 16384, [16384], [1], False),
    ("dense N=16384 causal", 16384, [16384], [1], True),
    ("dilated N=65536 [2048,4096,8192]/[1,2,4]", 65536, [2048, 4096, 8192], [1, 2, 4], False),
    ("dilated N=65536 [2048,4096,8192]/[1,2,4] causal", 65536, [2048, 4096, 8192], [1, 2, 4], True),
)
DISPATCH = "dispatch"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot")
    parser.add_argument("--kernels", nargs="+", default=["sdpa_cudnn", "flash_attn4", "sdpa_flash"])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    args = parser.parse_args(argv)
    registry = ring_core.get_registry().kernels
    kernels = [k for k in args.kernels if k in registry and not registry[k].availability_reasons()]
    skipped = {k: registry[k].availability_reasons() if k in registry else ["not registered"] for k in args.kernels
               if k not in kernels}  # fmt: skip
    columns = [*kernels, DISPATCH]
    results = []
    for label, n, segments, rates, causal in ROWS:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (
            torch.randn(1, n, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(4)
        )
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        TunedKernel.forget_choices()
        request = RingDilatedAttentionFlash.request(q, k, causal)
        dispatched = ring_core.select_kernel(request).name
        times: dict[str, list[float]] = {c: [] for c in columns}
        for order in (columns, columns[::-1]):
            for column in order:
                attn = RingDilatedAttentionFlash(segments, rates, kernel=None if column == DISPATCH else column)

                def step(attn=attn, q=q, k=k, v=v, dout=dout, causal=causal):
                    attn(q, k, v, is_causal=causal).backward(dout)

                try:
                    times[column].append(median_ms(step, iters=5, warmup=2))
                except Exception as exc:  # report and keep the other columns
                    print(f"{label} / {column}: {type(exc).__name__}: {exc}"[:400], file=sys.stderr)
                q.grad = k.grad = v.grad = None
        choices = sorted({f"{key[7]}x{key[8]}: {backend.name}" for key, backend in TunedKernel._choices.items()})
        ms = {c: statistics.mean(t) for c, t in times.items() if t}
        forced = [ms[c] for c in kernels if c in ms]
        row = {
            "case": label, "n": n, "segment_lengths": segments, "dilation_rates": rates, "causal": causal,
            **{f"{c} ms": t for c, t in ms.items()}, "dispatch_picks": dispatched,
            "dispatch_vs_best_forced": ms[DISPATCH] / min(forced) if forced and DISPATCH in ms else None,
            "ms": ms, "rounds": times, "tuned_choices": choices,
        }  # fmt: skip
        results.append(row)
        print(f"{label}: " + ", ".join(f"{c} {t:.2f}" for c, t in ms.items()) + f"; dispatch -> {dispatched} {choices}",
              file=sys.stderr, flush=True)  # fmt: skip
        del q, k, v, dout
    data = {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
        "what": f"ms per forward+backward, bf16, B=1, H={args.heads}, D={args.head_dim}, ring_dilated_flash",
        "skipped_kernels": skipped,
        "rows": results,
    }
    with open(args.out, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\n{data['card']}, {data['what']}")
    header = ["case", *columns, "dispatch/best"]
    print(" | ".join(header))
    for r in results:
        cells = [f"{r['ms'][c]:.2f}" if c in r["ms"] else "-" for c in columns]
        ratio = r["dispatch_vs_best_forced"]
        print(" | ".join([r["case"], *cells, f"{ratio:.3f}" if ratio else "-"]))
    if args.plot:
        plot(args.plot, data, columns)
    return 0


def plot(path: str, data: dict, columns: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(columns)
    for i, column in enumerate(columns):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r["ms"].get(column, 0) for r in rows], width, label=column)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["case"].replace(" [", "\n[") for r in rows], fontsize=8)
    ax.set_ylabel("ms, forward+backward")
    ax.set_title(f"{data['card']}: {data['what']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
