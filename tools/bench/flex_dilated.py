"""Exact dilated attention on one GPU: ring-flash vs FlexAttention vs the bare cuDNN calls, in one run.

The same LongNet dilated attention (SPEC.md, merge ``"lse"``) three ways, bf16, forward+backward:

- ``ring_dilated_flash``: this library (``RingDilatedAttentionFlash``, the kernel ``auto`` picks);
- ``FlexAttention``: ``torch.nn.attention.flex_attention`` compiled, with a ``score_mod`` that adds
  ``log C[h, t, s]`` (C = how many branches let query t see key s) and a ``BlockMask`` of ``C > 0``:
  the exact same numbers written in PyTorch's own sparse-attention API;
- ``bare cuDNN calls``: one SDPA cuDNN call per branch on tensors already laid out as
  ``(N/w, w/r, H, D)`` (no gather, scatter or merge): a floor no exact implementation reaches.

First each is checked against the float64 reference at a small size (errors in the JSON), then
timed at N=65536 (CUDA events, steady state, median; mirrored order so clock drift hits all alike).

    python -m tools.bench.flex_dilated [--out DIR]     # writes flex-dilated.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import ring_core
from ring_core.bench import useful_pairs
from ring_core.testing import relative_error
from ring_flash import RingDilatedAttentionFlash
from tools import command_line
from tools.bench.timing import median_ms

SEGMENTS, RATES = [2048, 4096, 8192], [1, 2, 4]
FWD_BWD = 3.5


def flex_dilated(num_heads: int, seq_len: int, causal: bool, device: str = "cuda") -> Callable[..., torch.Tensor]:
    """Exact dilated attention as FlexAttention: ``(B, H, N, D)`` in and out."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def count(h, q_idx, kv_idx):
        total = 0
        for w, r in zip(SEGMENTS, RATES):
            offset = h % r
            total = total + ((q_idx // w == kv_idx // w) & (q_idx % r == offset) & (kv_idx % r == offset)).int()
        return total

    def mask_mod(b, h, q_idx, kv_idx):
        allowed = count(h, q_idx, kv_idx) > 0
        return allowed & (kv_idx <= q_idx) if causal else allowed

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + torch.log(count(h, q_idx, kv_idx).clamp(min=1).to(score.dtype))

    begin = time.perf_counter()
    block_mask = create_block_mask(
        mask_mod, None, num_heads, seq_len, seq_len, device=device, _compile=device == "cuda"
    )
    if device == "cuda":
        torch.cuda.synchronize()
    flex_dilated.block_mask_s = time.perf_counter() - begin
    compiled = torch.compile(flex_attention, dynamic=False) if device == "cuda" else flex_attention
    return partial(compiled, score_mod=score_mod, block_mask=block_mask)


def bare_cudnn(seq_len: int, h: int, d: int, causal: bool, gen: torch.Generator) -> Callable[[], object]:
    batches = []
    for w, r in zip(SEGMENTS, RATES):
        shape = (seq_len // w, h, w // r, d)
        q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        batches.append(([x.requires_grad_() for x in (q, k, v)], torch.randn_like(q)))

    def step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for (q, k, v), dout in batches:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                torch.autograd.grad(out, (q, k, v), dout)

    return step


def accuracy(seq_len: int, heads: int, head_dim: int) -> list[dict]:
    """bf16 errors of ours and FlexAttention against the float64 reference (same inputs), output and gradients."""
    return [row for causal in (False, True) for row in accuracy_case(seq_len, heads, head_dim, causal)]


def accuracy_case(seq_len: int, heads: int, head_dim: int, causal: bool) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, dout = (torch.randn(1, seq_len, heads, head_dim, device="cuda", generator=gen) for _ in range(4))
    ref_inputs = [x.double().requires_grad_() for x in (q, k, v)]
    ref = ring_core.reference_attention(*ref_inputs, segment_lengths=SEGMENTS, dilation_rates=RATES, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_inputs, dout.double())
    flex = flex_dilated(heads, seq_len, causal)
    ours = RingDilatedAttentionFlash(SEGMENTS, RATES)
    candidates = {
        "ring_dilated_flash": lambda q, k, v: ours(q, k, v, is_causal=causal),
        "FlexAttention": lambda q, k, v: flex(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2),
    }
    for name, fn in candidates.items():
        inputs = [x.bfloat16().requires_grad_() for x in (q, k, v)]
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, dout.bfloat16())
        errors = {"out": relative_error(out, ref)}
        errors |= {f"d{n}": relative_error(g, r) for n, g, r in zip("qkv", grads, ref_grads)}
        rows.append({"name": name, "causal": causal, "N": seq_len, "H": heads, "D": head_dim, **errors})
    return rows


def timing(seq_len: int, heads: int, head_dim: int, iters: int) -> list[dict]:
    return [row for causal in (False, True) for row in timing_case(seq_len, heads, head_dim, iters, causal)]


def timing_case(seq_len: int, heads: int, head_dim: int, iters: int, causal: bool) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    pairs = useful_pairs(seq_len, heads, SEGMENTS, RATES, causal=causal)
    shape = (1, seq_len, heads, head_dim)
    q, k, v, dout = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    ours = RingDilatedAttentionFlash(SEGMENTS, RATES)
    kernel = ring_core.select_kernel(RingDilatedAttentionFlash.request(q, k, causal)).name
    qt, kt, vt, doutt = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v, dout))
    qt, kt, vt = (x.requires_grad_() for x in (qt, kt, vt))
    flex = flex_dilated(heads, seq_len, causal)
    block_mask_s = flex_dilated.block_mask_s
    steps = {
        "bare cuDNN calls": (bare_cudnn(seq_len, heads, head_dim, causal, gen), "sdpa_cudnn"),
        "ring_dilated_flash": (
            lambda: torch.autograd.grad(ours(q, k, v, is_causal=causal), (q, k, v), dout),
            kernel,
        ),
        "FlexAttention": (lambda: torch.autograd.grad(flex(qt, kt, vt), (qt, kt, vt), doutt), "flex_attention"),
    }
    begin = time.perf_counter()
    steps["FlexAttention"][0]()  # compiles forward and backward
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - begin
    measured: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, float] = {}
    for name in [*steps, *reversed(steps)]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        measured[name].append(median_ms(steps[name][0], iters=iters, warmup=2))
        peaks.setdefault(name, (torch.cuda.max_memory_allocated() - base) / 2**30)
    bare = statistics.mean(measured["bare cuDNN calls"])
    for name, (_, kernel_name) in steps.items():
        ms = statistics.mean(measured[name])
        row = {"name": name, "kernel": kernel_name, "causal": causal, "ms": ms, "runs_ms": measured[name]}
        row |= {"tflops": FWD_BWD * 4 * head_dim * pairs / (ms * 1e-3) / 1e12, "bare_over_this": bare / ms}
        row |= {"extra_peak_gib": peaks[name]}
        if name == "FlexAttention":
            row |= {"block_mask_s": block_mask_s, "first_call_s": compile_s}
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--accuracy-len", type=int, default=16384)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tools.bench.flex_dilated needs a CUDA GPU", file=sys.stderr)
        return 2
    heads, head_dim = 16, 128
    report = {
        "meta": {
            "card": torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": command_line(),
            "title": (
                f"exact dilated attention, bf16, B=1 N={args.seq_len} H={heads} D={head_dim}, "
                f"segments {SEGMENTS} rates {RATES}; forward+backward"
            ),
        }
    }
    begin = time.perf_counter()
    report["accuracy"] = {"rows": accuracy(args.accuracy_len, 4, 64)}
    print(f"[accuracy] {time.perf_counter() - begin:.1f} s", flush=True)
    begin = time.perf_counter()
    report["results"] = timing(args.seq_len, heads, head_dim, args.iters)
    print(f"[timing] {time.perf_counter() - begin:.1f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flex-dilated.json").write_text(json.dumps(report, indent=2))
    for row in report["accuracy"]["rows"]:
        print({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()})
    for row in report["results"]:
        print({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items() if k != "runs_ms"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
