"""ring vs Ulysses vs hybrid vs all-gather on several GPUs (NCCL), and the production features.

For each world size P (default 4, then 2) one group of P processes (torch.multiprocessing, NCCL):

- ``accuracy``: global N=4096, B=1, H=8, D=64, bf16; every strategy vs the float64 reference
  (computed on the GPU), global errors over all ranks' rows: out and the worst of dq, dk, dv.
- ``timing``: bf16, B=1, H=16, D=128, 32K tokens per GPU, forward+backward, median of a few
  steps (slowest rank). Cases: dense causal (zigzag), dilated causal with segments inside a
  shard ([2048, 8192, 32768] / [1, 2, 4]) and dilated causal with segments spanning shards
  ([8192, 32768, 131072] / [1, 4, 16], relative to 32K per GPU). Strategies ring, ulysses,
  hybrid (u=2, P=4 only), allgather, and RingDilatedAttentionProduction (ring; with and
  without checkpointing); the ratio is against ring-core's RingDilatedAttention measured in
  the same run. Peak memory and the memory kept between forward and backward.
- ``determinism``: RingDilatedAttentionProduction(deterministic=True, dropout=0.1) twice from
  scratch on the same inputs: bitwise equal outputs and gradients on every rank?

Writes ``distributed.json``, ``distributed.md`` and ``distributed.png`` into
``--out``; prints the tables last.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        python -m tools.bench.distributed --out DIR [--world-sizes 4 2] [--sections accuracy,timing,determinism]

``--device cpu`` runs a tiny smoke version with gloo. ``--plot-only JSON`` re-plots.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tools import multigpu
from tools.multigpu import flops_per_gpu, log, max_over_ranks, median_ms

TIMING_CASES = [  # name, segments relative to 32K per GPU (None: dense), rates, layout, causal
    ("dense causal", None, [1], "zigzag", True),
    ("dilated causal, in-shard segments", [2048, 8192, 32768], [1, 2, 4], "contiguous", True),
    ("dilated causal, spanning segments", [8192, 32768, 131072], [1, 4, 16], "contiguous", True),
]
ACCURACY_CASES = [  # name, segments relative to N=4096 (None: dense), rates, layout, causal
    ("dense causal zigzag", None, [1], "zigzag", True),
    ("dilated causal", [256, 1024, 4096], [1, 2, 4], "contiguous", True),
]


def strategies(world_size: int) -> list[tuple[str, dict]]:
    found = [("ring", {"strategy": "ring"}), ("ulysses", {"strategy": "ulysses"})]
    if world_size >= 4:
        found.append(("hybrid u=2", {"strategy": "hybrid", "ulysses_degree": 2}))
    found.append(("allgather", {"strategy": "allgather"}))
    return found


def accuracy(rank: int, world_size: int, device: torch.device, quick: bool) -> list[dict]:
    from ring_core import reference_attention, shard_sequence, unshard_sequence
    from ring_distributed import RingDistributedDilatedAttention

    n, h, d = (256, 8, 16) if quick else (4096, 8, 64)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, segments, rates, layout, causal in ACCURACY_CASES:
        config = {"segment_lengths": [n] if segments is None else [s * n // 4096 for s in segments],
                  "dilation_rates": rates}  # fmt: skip
        generator = torch.Generator(device=device).manual_seed(0)
        full = [torch.randn(1, n, h, d, device=device, dtype=torch.float64, generator=generator) for _ in range(4)]
        q, k, v, dout = full
        ref = None
        if rank == 0:
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = reference_attention(*leaves, **config, is_causal=causal)
            ref = [out.detach(), *torch.autograd.grad(out, leaves, dout)]
        for label, options in strategies(world_size):
            log(rank, f"P={world_size} accuracy: {name}, {label}")
            module = RingDistributedDilatedAttention(**config, layout=layout, **options)
            leaves = [shard_sequence(x, layout).to(dtype).requires_grad_() for x in (q, k, v)]
            out = module(*leaves, is_causal=causal)
            out.backward(shard_sequence(dout, layout).to(dtype))
            gathered = [unshard_sequence(t.detach().contiguous(), layout) for t in (out, *(x.grad for x in leaves))]
            if rank == 0:
                errors = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(gathered, ref)]
                rows.append({"section": "accuracy", "case": name, "P": world_size, "strategy": label,
                             "err_out": errors[0], "err_grad": max(errors[1:])})  # fmt: skip
    return rows


def timing(rank: int, world_size: int, device: torch.device, quick: bool) -> list[dict]:
    from ring_core import RingDilatedAttention
    from ring_distributed import RingDilatedAttentionProduction, RingDistributedDilatedAttention

    b, n_local, h, d = (1, 256, 4, 16) if quick else (1, 32768, 16, 128)
    iters, warmup = (2, 1) if quick else (5, 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n_local * world_size
    rows = []
    for name, segments, rates, layout, causal in TIMING_CASES:
        config = {"segment_lengths": [n] if segments is None else [s * n_local // 32768 for s in segments],
                  "dilation_rates": rates, "layout": layout}  # fmt: skip
        flops = flops_per_gpu(
            b, n, h, d, None if segments is None else config["segment_lengths"], rates, causal, world_size
        )
        q, k, v = (torch.randn(b, n_local, h, d, dtype=dtype, device=device) for _ in range(3))
        production = {"timeout": 120.0, "on_nonfinite": "raise"}
        variants = [("baseline: ring_core RingDilatedAttention", RingDilatedAttention, {})]
        variants += [(label, RingDistributedDilatedAttention, o) for label, o in strategies(world_size)]
        variants += [
            ("production (ring, timeout, guard)", RingDilatedAttentionProduction, production),
            ("production + checkpoint", RingDilatedAttentionProduction, {**production, "checkpoint": True}),
        ]
        baseline = None
        for label, cls, options in variants:
            log(rank, f"P={world_size} timing: {name}, {label}")
            row = {"section": "timing", "case": name, "P": world_size, "N_per_gpu": n_local, "variant": label}
            try:
                module = cls(**config, **options)

                def step(module=module, q=q, k=k, v=v, causal=causal):
                    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                    module(qq, kk, vv, is_causal=causal).sum().backward()

                ms = median_ms(step, iters, warmup, device)
                row.update(ms=ms, tflops_per_gpu=flops / ms / 1e9)
                if device.type == "cuda":  # memory held between forward and backward, and the peak of a step
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                    out = module(qq, kk, vv, is_causal=causal)
                    kept = torch.cuda.memory_allocated() - before
                    out.sum().backward()
                    del out, qq, kk, vv
                    torch.cuda.synchronize()
                    row["kept_mib"] = max_over_ranks(kept / 2**20, device)
                    row["peak_mib"] = max_over_ranks((torch.cuda.max_memory_allocated() - before) / 2**20, device)
                strategy = getattr(module, "last_strategy", None)
                row["strategy"] = f"{strategy[0]} u={strategy[1]}" if strategy else "ring"
                if baseline is None:
                    baseline = ms
                row["speedup_vs_baseline"] = baseline / ms
            except Exception as exc:  # report, keep going (every rank takes the same path)
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del q, k, v
    return rows


def determinism(rank: int, world_size: int, device: torch.device, quick: bool) -> list[dict]:
    from ring_distributed import RingDilatedAttentionProduction

    b, n_local, h, d = (1, 256, 4, 16) if quick else (1, 8192, 16, 128)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = {"segment_lengths": [n_local // 4, n_local * world_size], "dilation_rates": [1, 4]}
    generator = torch.Generator(device=device).manual_seed(rank)
    q, k, v = (torch.randn(b, n_local, h, d, dtype=dtype, device=device, generator=generator) for _ in range(3))
    rows = []
    for label, options in (("deterministic=True, dropout 0.1", {"deterministic": True, "dropout": 0.1, "seed": 3}),
                           ("default, no dropout", {}), ("default, dropout 0.1", {"dropout": 0.1})):  # fmt: skip
        log(rank, f"P={world_size} determinism: {label}")
        runs = []
        for _ in range(2):
            module = RingDilatedAttentionProduction(**config, **options).train()
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = module(*leaves, is_causal=True)
            out.float().square().sum().backward()
            runs.append([out.detach(), *(x.grad for x in leaves)])
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        flag = torch.tensor([0.0 if same else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        rows.append({"section": "determinism", "P": world_size, "case": label, "bitwise_identical": flag.item() == 0})
    return rows


SECTIONS = {"accuracy": accuracy, "timing": timing, "determinism": determinism}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict], card: str) -> str:
    from ring_core.testing import format_table

    lines = [f"Card: {card}", ""]
    acc = [r for r in rows if r["section"] == "accuracy" and "error" not in r]
    if acc:
        lines += ["Accuracy (bf16 vs float64 reference, global N=4096, H=8, D=64)", "```"]
        table = [(r["P"], r["case"], r["strategy"], f"{r['err_out']:.1e}", f"{r['err_grad']:.1e}") for r in acc]
        lines += [format_table(table, ["P", "case", "strategy", "err out", "max err grad"]), "```", ""]
    tim = [r for r in rows if r["section"] == "timing" and "case" in r]
    if tim:
        lines += ["Forward+backward, bf16, B=1, H=16, D=128, 32K tokens per GPU (slowest rank, median)", "```"]
        table = [
            (r["P"], r["case"], r["variant"], r.get("strategy", "-"), _fmt(r.get("ms"), ".1f"),
             _fmt(r.get("tflops_per_gpu"), ".0f"), _fmt(r.get("speedup_vs_baseline"), ".2f"),
             _fmt(r.get("kept_mib"), ".0f"), _fmt(r.get("peak_mib"), ".0f"), r.get("error", ""))
            for r in tim
        ]  # fmt: skip
        header = ["P", "case", "variant", "ran as", "ms", "TFLOP/s/GPU", "x baseline", "kept MiB", "peak MiB", "error"]
        lines += [format_table(table, header), "```", ""]
        for p in sorted({r["P"] for r in tim}):
            for case in dict.fromkeys(r["case"] for r in tim):
                cands = [r for r in tim if r["P"] == p and r["case"] == case and "ms" in r
                         and not r["variant"].startswith(("baseline", "production"))]  # fmt: skip
                if cands:
                    best = min(cands, key=lambda r: r["ms"])
                    lines.append(f"P={p}, {case}: fastest strategy {best['variant']} ({best['ms']:.1f} ms)")
        lines.append("")
    det = [r for r in rows if r["section"] == "determinism" and "case" in r]
    if det:
        lines += ["Determinism (two runs from scratch, same inputs)", "```"]
        lines += [format_table([(r["P"], r["case"], r["bitwise_identical"]) for r in det],
                               ["P", "mode", "bitwise identical"]), "```"]  # fmt: skip
    errors = [r for r in rows if "error" in r and "case" not in r]
    for r in errors:
        lines += [f"ERROR in {r['section']} P={r['P']}:", r["error"]]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, card: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tim = [r for r in rows if r["section"] == "timing" and "ms" in r]
    sizes = sorted({r["P"] for r in tim}, reverse=True)
    cases = list(dict.fromkeys(r["case"] for r in tim))
    fig, axes = plt.subplots(len(sizes), 1, figsize=(11, 3.6 * len(sizes)), squeeze=False)
    for ax, p in zip(axes[:, 0], sizes):
        variants = list(dict.fromkeys(r["variant"] for r in tim if r["P"] == p))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            values = [next((r["ms"] for r in tim if r["P"] == p and r["case"] == c and r["variant"] == variant), 0)
                      for c in cases]  # fmt: skip
            ax.bar([x + i * width for x in range(len(cases))], values, width, label=variant)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], cases, fontsize=8)
        ax.set(ylabel="fwd+bwd ms (lower is better)", title=f"P={p} GPUs, 32K tokens per GPU, H=16, D=128, bf16")
        ax.legend(fontsize=7)
    fig.suptitle(card)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    return multigpu.main(
        argv, name="distributed", description=__doc__.splitlines()[0], sections=SECTIONS, world_sizes=[4, 2],
        markdown=markdown, plot=plot,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
