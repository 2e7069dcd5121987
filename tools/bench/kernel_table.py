"""Measure which kernel is fastest per block shape on this card: the table the ``tuned`` backend follows.

For each head dim, causal flag and block length L: forward+backward of each kernel on
``tokens / L`` blocks of L rows (bf16, ``--heads`` heads), kernels alternating, median of
``--repeats`` (:func:`ring_flash.kernel_table.measure_rows`). Writes the table as JSON
(``--out``; copy it to ``packages/ring-flash/src/ring_flash/tables/`` to ship it, or point
``RING_FLASH_KERNEL_TABLE`` at it) and a plot (``--plot``), and prints it.

    python -m tools.bench.kernel_table --out table.json --plot table.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from importlib import metadata

import torch

import ring_core
from ring_flash.kernel_table import load_table, measure_rows
from tools import command_line


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the table (JSON)")
    parser.add_argument("--plot", help="a PNG of time per length and kernel")
    parser.add_argument("--kernels", nargs="+", default=["sdpa_cudnn", "flash_attn4", "sdpa_flash"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[128])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 1
    registry = ring_core.get_registry().kernels
    kernels = []
    for name in args.kernels:
        reasons = registry[name].availability_reasons() if name in registry else ["not registered"]
        if reasons:
            print(f"skipping {name}: {'; '.join(reasons)}", file=sys.stderr)
        else:
            kernels.append(registry[name])
    rows = measure_rows(
        kernels, lengths=args.lengths, head_dims=args.head_dims, heads=args.heads, tokens=args.tokens,
        repeats=args.repeats, progress=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    card = torch.cuda.get_device_name()
    table = {
        "card": card,
        "capability": list(torch.cuda.get_device_capability()),
        "dtypes": ["bfloat16"],
        "meta": {
            "dtype": "bfloat16",
            "heads": args.heads,
            "tokens": args.tokens,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(),
            "flash_attn_4": version("flash-attn-4"),
            "date": datetime.date.today().isoformat(),
            "command": command_line(),
            "what": "milliseconds of one forward+backward of each kernel on tokens/length blocks, median",
        },
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(table, f, indent=1)
    print("\n".join(load_table(args.out).lines()))
    if args.plot:
        plot(args.plot, table)
    return 0


def plot(path: str, table: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["head_dim"], r["causal"]) for r in table["rows"]})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (head_dim, causal) in zip(axes[0], panels):
        rows = [r for r in table["rows"] if r["head_dim"] == head_dim and r["causal"] == causal]
        for name in dict.fromkeys(n for r in rows for n in r["tflops"]):
            points = [(r["length"], r["tflops"][name]) for r in rows if name in r["tflops"]]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block length L")
        ax.set_ylabel("TFLOP/s (forward+backward)")
        ax.set_title(f"D={head_dim}{', causal' if causal else ''}")
        ax.grid(alpha=0.3)
        ax.legend()
    meta = table["meta"]
    fig.suptitle(f"{table['card']}, {meta['dtype']}, H={meta['heads']}, {meta['tokens']} tokens per batch of blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
