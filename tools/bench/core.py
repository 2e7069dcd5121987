"""ring-core's own performance checks, not a test.

CPU (default): float32, B=1, H=8, D=64, segments [2048, 4096, 8192], rates
[1, 2, 4], N=65536, forward+backward: time and peak memory (must stay under 3 GiB:
no quadratic tensors).

CUDA (``--device cuda``): core kernels only (``math``; ring-flash adds the fast
ones), bf16, N=32768, H=16, D=128, dense and dilated, next to plain SDPA in the
same run.

Writes JSON and a plot into ``--out`` (default ``bench-results/``).

    python -m tools.bench.core [--device cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import torch

from ring_core import create_attention
from ring_core.bench import (
    BenchResult,
    dense_pairs,
    device_name,
    measure,
    plot,
    sdpa_kernel_name,
    useful_pairs,
    write_json,
)
from ring_core.testing import format_table
from tools import command_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--kernel", default="math", help="kernel forced on CUDA (core's own)")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    b, h, d = (1, 16, 128) if cuda else (1, 8, 64)
    n = args.seq_len or (32768 if cuda else 65536)
    dtype = torch.bfloat16 if cuda else torch.float32
    segments, rates = [2048, 4096, 8192], [1, 2, 4]
    card = device_name(device)
    repeats = 5 if cuda else 1

    q, k, v = (torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    results: list[BenchResult] = []
    kernel = args.kernel if cuda else None
    dilated = create_attention("dilated", segment_lengths=segments, dilation_rates=rates, kernel=kernel)
    dense = create_attention("dilated", segment_lengths=[n], dilation_rates=[1], kernel=kernel)
    for causal in (False, True):
        label = "causal" if causal else "non-causal"
        pairs = useful_pairs(n, h, segments, rates, causal=causal)
        r = measure(f"dilated {label}", lambda c=causal: dilated(q, k, v, is_causal=c), pairs, d, b, n, device, repeats)
        results.append(r)
        if cuda:
            results.append(
                measure(
                    f"dense {label} (core)",
                    lambda c=causal: dense(q, k, v, is_causal=c),
                    dense_pairs(n, h, causal),
                    d,
                    b,
                    n,
                    device,
                    repeats,
                )
            )

            def sdpa(c=causal):
                return torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=c
                )

            kernel_name = sdpa_kernel_name(q.transpose(1, 2), causal)
            results.append(
                measure(f"sdpa {label}", sdpa, dense_pairs(n, h, causal), d, b, n, device, repeats, kernel_name)
            )
    title = f"{card}, {str(dtype)[6:]}, B={b} N={n} H={h} D={d}, segments {segments} rates {rates}, fwd+bwd"
    print(title)
    rows = [(r.name, r.kernel, f"{r.time_ms:.1f}", f"{r.tflops:.3f}", f"{r.peak_mem_mib or 0:.0f}") for r in results]
    print(format_table(rows, ["what", "kernel", "time ms", "useful TFLOP/s", "peak MiB above inputs"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"core-{device.type}"
    meta = {
        "card": card,
        "title": title,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": command_line(),
    }
    write_json(out / f"{stem}.json", meta, results)
    plot(out / f"{stem}.png", results, title)


if __name__ == "__main__":
    main()
