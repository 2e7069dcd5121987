"""ring-flash on one GPU: its targets, each next to its baseline measured in the same run.

Sections (bf16, one card, forward+backward unless said):

- ``kernels``: every available backend on one segmented batch (32 x 2048, H=16, D=128):
  measured order next to the registered priorities.
- ``dilated``: segments [2048, 4096, 8192], rates [1, 2, 4], N=65536, B=1, H=16, D=128,
  causal and not: ``ring_dilated_flash`` (Triton merges; with torch merges), core's engine with the same kernel, against the bare SDPA cuDNN calls on tensors
  already laid out as ``(B*N/w, w/r, H, D)`` (no gather, scatter or merge). Ratio
  bare/ours (target >= 0.90), useful TFLOP/s (only the pairs the pattern allows).
- ``dense``: ``segment_lengths=[N]``, rate 1 against plain SDPA cuDNN (target <= 1.03).
- ``memory``: H=8, D=128: peak at N = 4,194,304 and the largest N that fits.
- ``accuracy``: bf16 and fp16 against the float64 reference, next to SDPA's error on
  the same inputs.

Writes ``flash_dilated.json`` and ``flash_dilated.png`` into ``--out``; prints a
table last.

    python -m tools.bench.flash_dilated [--out DIR] [--quick] [--sections dilated,dense,...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
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
from ring_flash.kernels import SDPACuDNNKernel, all_kernels

FWD_BWD = 3.5
SEGMENTS, RATES = [2048, 4096, 8192], [1, 2, 4]
SECTIONS = ("kernels", "dilated", "dense", "memory", "accuracy")
DEVICE = "cuda"


def timed(step: Callable[[], object], iters: int, warmup: int = 2, repeats: int = 3) -> float:
    """Milliseconds per ``step`` in steady state: ``iters`` steps back to back (as in training),
    median over ``repeats`` (CUDA events; one synchronisation per repeat). The host's time to
    issue one step (Python, launches) is left in ``timed.host_ms``."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        begin = time.perf_counter()
        for _ in range(iters):
            step()
        host.append((time.perf_counter() - begin) * 1e3 / iters)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    timed.host_ms = statistics.median(host)
    return statistics.median(times)


def graphed_on_first_call(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` captured in a CUDA graph on its first call, then replayed."""
    replay = None

    def run():
        nonlocal replay
        replay = replay or graphed(step)
        return replay()

    return run


def graphed(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` captured once in a CUDA graph and replayed: its GPU time without host overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def profile_step(step: Callable[[], object], top: int = 12) -> list[dict]:
    """The GPU kernels of one step, most GPU time first."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        rows.append({"kernel": event.key[:90], "ms": us / 1e3, "calls": event.count})
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def randn(*shape, dtype=torch.bfloat16, grad=False, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=gen).requires_grad_(grad)


def fwd_bwd(fn: Callable[..., torch.Tensor], q, k, v, dout) -> Callable[[], object]:
    """One forward+backward step; gradients are returned, never accumulated into ``.grad``."""

    def step():
        out = fn(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)

    return step


def without_triton(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` with the fused path's merges as torch ops (``RING_FLASH_TRITON=0``)."""

    def run():
        os.environ["RING_FLASH_TRITON"] = "0"
        try:
            return step()
        finally:
            del os.environ["RING_FLASH_TRITON"]

    return run


def tflops(pairs: int, head_dim: int, ms: float) -> float:
    return FWD_BWD * 4 * head_dim * pairs / (ms * 1e-3) / 1e12


# -- sections ----------------------------------------------------------------------------------


def bench_kernels(args) -> dict:
    shape = (32, 2048, 16, 128)
    rows = []
    for backend in all_kernels():
        for causal in (False, True):
            q, k, v, dout = (randn(*shape, seed=i) for i in range(4))
            request = ring_core.KernelRequest.for_tensors(q, k, causal=causal)
            reasons = backend.not_supported_reasons(request)
            row = {"kernel": backend.name, "priority": backend.priority, "causal": causal}
            if reasons:
                rows.append({**row, "reasons": reasons})
                continue

            def step(backend=backend, q=q, k=k, v=v, dout=dout, causal=causal, scale=128**-0.5):
                out, lse = backend.forward(q, k, v, scale=scale, causal=causal)
                return backend.backward(dout, q, k, v, out, lse, scale=scale, causal=causal)

            try:
                ms = timed(step, args.iters)
            except Exception as exc:  # report and go on
                rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            pairs = shape[0] * shape[2] * (shape[1] * (shape[1] + 1) // 2 if causal else shape[1] ** 2)
            rows.append({**row, "ms": ms, "tflops": tflops(pairs, 128, ms)})
    timed_rows = [r for r in rows if "ms" in r and not r["causal"]]
    measured = [r["kernel"] for r in sorted(timed_rows, key=lambda r: r["ms"])]
    registered = [r["kernel"] for r in sorted(timed_rows, key=lambda r: -r["priority"])]
    return {"shape": shape, "rows": rows, "measured_order": measured, "priority_order": registered}


def bare_cudnn_step(n: int, h: int, d: int, causal: bool) -> Callable[[], object]:
    """The bare SDPA cuDNN calls: one dense call per branch on pre-laid-out ``(B*N/w, w/r, H, D)`` tensors."""
    batches = []
    for i, (w, r) in enumerate(zip(SEGMENTS, RATES)):
        shape = (n // w, w // r, h, d)
        q, k, v = (randn(*shape, grad=True, seed=10 * i + j) for j in range(3))
        batches.append((q, k, v, randn(*shape, seed=10 * i + 3)))

    def step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            for q, k, v, dout in batches:
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
                )
                torch.autograd.grad(out, (q, k, v), dout.transpose(1, 2))

    return step


def bench_dilated(args) -> dict:
    n, h, d = args.seq_len, 16, 128
    rows, profiles = [], {}
    for causal in (False, True):
        pairs = useful_pairs(n, h, SEGMENTS, RATES, causal=causal)
        q, k, v = (randn(1, n, h, d, grad=True, seed=i) for i in range(3))
        dout = randn(1, n, h, d, seed=3)
        kernel = ring_core.select_kernel(RingDilatedAttentionFlash.request(q, k, causal)).name
        ours = RingDilatedAttentionFlash(SEGMENTS, RATES)
        engine = ring_core.DilatedAttention(SEGMENTS, RATES, kernel=kernel)
        candidates = {
            "bare cuDNN calls": bare_cudnn_step(n, h, d, causal),
            "ring_dilated_flash": fwd_bwd(partial(ours, is_causal=causal), q, k, v, dout),
            "ring_dilated_flash, torch merges": without_triton(fwd_bwd(partial(ours, is_causal=causal), q, k, v, dout)),
            "core engine (dilated)": fwd_bwd(partial(engine, is_causal=causal), q, k, v, dout),
        }
        for name in ("bare cuDNN calls", "ring_dilated_flash"):  # GPU time alone (no host overhead)
            candidates[f"{name} (CUDA graph)"] = graphed_on_first_call(candidates[name])
        # bare and ours again at the end, in mirrored order, so clock drift hits both alike
        order = [*candidates, "ring_dilated_flash", "bare cuDNN calls"]
        measured: dict[str, dict] = {}
        for name in order:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                ms = timed(candidates[name], args.iters)
            except Exception as exc:
                measured[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                traceback.print_exc()
                continue
            row = measured.setdefault(name, {"runs_ms": [], "host_ms": timed.host_ms})
            row["runs_ms"].append(ms)
            row.setdefault("extra_peak_gib", (torch.cuda.max_memory_allocated() - base) / 2**30)
        bare_ms = statistics.mean(measured["bare cuDNN calls"]["runs_ms"])
        for name, row in measured.items():
            if "error" in row:
                rows.append({"name": name, "causal": causal, **row})
                continue
            ms = statistics.mean(row["runs_ms"])
            rows.append({"name": name, "causal": causal, "kernel": kernel, "ms": ms, "tflops": tflops(pairs, d, ms),
                         "bare_over_ours": bare_ms / ms, **row})  # fmt: skip
        if args.profile:
            for name in ("bare cuDNN calls", "ring_dilated_flash"):
                profiles[f"{name}, {'causal' if causal else 'full'}"] = profile_step(candidates[name])
        del q, k, v, dout
    return {
        "config": {"B": 1, "N": n, "H": h, "D": d, "segments": SEGMENTS, "rates": RATES, "dtype": "bfloat16"},
        "target": "bare/ours >= 0.90",
        "cudnn_strided_inputs": SDPACuDNNKernel.strided_inputs,
        "cudnn_backward_variant": SDPACuDNNKernel.backward_variant,
        "rows": rows,
        "profiles": profiles,
    }


def bench_dense(args) -> dict:
    h, d = 16, 128
    rows, profiles = [], {}
    for n in args.dense_lens:
        for causal in (False, True):
            q, k, v = (randn(1, n, h, d, grad=True, seed=i) for i in range(3))
            dout = randn(1, n, h, d, seed=3)
            ours = RingDilatedAttentionFlash([n], [1])

            def sdpa(q, k, v, causal=causal):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(
                        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
                    ).transpose(1, 2)

            sdpa_step = fwd_bwd(sdpa, q, k, v, dout)
            ours_step = fwd_bwd(partial(ours, is_causal=causal), q, k, v, dout)
            sdpa_ms, ours_ms = [], []
            for first in (True, False):  # mirrored order: clock drift hits both alike
                for step, times in ((sdpa_step, sdpa_ms), (ours_step, ours_ms))[:: 1 if first else -1]:
                    times.append(timed(step, args.iters))
            s, o = statistics.median(sdpa_ms), statistics.median(ours_ms)
            pairs = h * (n * (n + 1) // 2 if causal else n * n)
            rows.append({
                "N": n, "causal": causal, "sdpa_cudnn_ms": s, "ours_ms": o, "ours_over_sdpa": o / s,
                "sdpa_tflops": tflops(pairs, d, s), "ours_tflops": tflops(pairs, d, o),
            })  # fmt: skip
            if args.profile:  # GPU time alone, and the host's time per step
                for name, step in (("sdpa", sdpa_step), ("ours", ours_step)):
                    rows[-1][f"{name}_graph_ms"] = timed(graphed_on_first_call(step), args.iters)
                    timed(step, args.iters)
                    rows[-1][f"{name}_host_ms"] = timed.host_ms
            if args.profile and n == min(args.dense_lens):
                for name, step in (("SDPA cuDNN", sdpa_step), ("ring_dilated_flash", ours_step)):
                    profiles[f"dense N={n} {'causal' if causal else 'full'}, {name}"] = profile_step(step)
            del q, k, v, dout
    return {
        "config": {"B": 1, "H": h, "D": d, "dtype": "bfloat16"},
        "target": "ours/sdpa <= 1.03",
        "rows": rows,
        "profiles": profiles,
    }


def bench_memory(args) -> dict:
    h, d = 8, 128
    attn = RingDilatedAttentionFlash(SEGMENTS, RATES)

    def attempt(n: int) -> dict | None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        tensors = []
        try:
            q, k, v = (
                torch.randn(1, n, h, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)
            )
            tensors += [q, k, v]
            dout = torch.randn(1, n, h, d, device=DEVICE, dtype=torch.bfloat16)
            tensors.append(dout)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            out = attn(q, k, v)
            forward_peak = torch.cuda.max_memory_allocated() / 2**30
            grads = torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - begin
            peak = torch.cuda.max_memory_allocated() / 2**30
            # in pieces: isfinite of a whole bf16 tensor makes temporaries twice its size
            ok = all(torch.isfinite(c).all().item() for g in (out, *grads) for c in g.flatten().split(1 << 26))
            del out, grads
            return {"N": n, "peak_gib": peak, "forward_peak_gib": forward_peak, "seconds": seconds, "finite": ok}
        except torch.OutOfMemoryError:
            return None
        finally:
            del tensors
            gc.collect()  # an out-of-memory traceback keeps the failed attempt's tensors in a cycle
            torch.cuda.empty_cache()

    target, step = args.memory_target, args.memory_step
    results: dict[int, dict | None] = {}

    def fits(n: int) -> bool:
        if n not in results:
            results[n] = attempt(n)
        return results[n] is not None

    if fits(target):  # grow by 25% until it fails
        low, high = target, None
        while high is None and low < 8 * target:
            n = (low + low // 4) // step * step
            low, high = (n, None) if fits(n) else (low, n)
        high = high or low
    else:  # halve until it fits
        high, low = target, target // 2
        while low > step and not fits(low):
            high, low = low, low // 2
    while high - low > step:
        mid = (low + high) // 2 // step * step
        low, high = (mid, high) if fits(mid) else (low, mid)
    largest = results.get(low)
    minimum = 8 * h * d * 2 / 2**30  # q, k, v, out, dout, dq, dk, dv in bf16, GiB per token
    return {
        "config": {"B": 1, "H": h, "D": d, "segments": SEGMENTS, "rates": RATES, "dtype": "bfloat16"},
        "card_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
        "target_N": target,
        "at_target": results[target],
        "tried": {n: r is not None for n, r in sorted(results.items())},
        "largest": largest,
        "floor_gib_per_million_tokens": minimum * 1e6,
    }


def bench_accuracy(args) -> dict:
    n, h, d = args.accuracy_len, 8, 128
    segments, rates = [n // 4, n // 2, n], [1, 2, 4]
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for causal in (False, True):
            q64, k64, v64 = (randn(1, n, h, d, dtype=torch.float64, seed=20 + i) for i in range(3))
            dout64 = randn(1, n, h, d, dtype=torch.float64, seed=23)

            def reference(segs, rs, q64=q64, k64=k64, v64=v64, dout64=dout64, causal=causal):
                leaves = [x.clone().requires_grad_() for x in (q64, k64, v64)]
                out = ring_core.reference_attention(*leaves, segment_lengths=segs, dilation_rates=rs, is_causal=causal)
                return [out.detach(), *torch.autograd.grad(out, leaves, dout64)]

            def errors(fn, expected, dtype=dtype, q64=q64, k64=k64, v64=v64, dout64=dout64):
                leaves = [x.to(dtype).requires_grad_() for x in (q64, k64, v64)]
                out = fn(*leaves)
                got = [out, *torch.autograd.grad(out, leaves, dout64.to(dtype))]
                return dict(zip(("out", "dq", "dk", "dv"), (relative_error(a, b) for a, b in zip(got, expected))))

            def sdpa(q, k, v, causal=causal):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
                ).transpose(1, 2)

            dense_ref = reference(None, None)
            dilated_ref = reference(segments, rates)
            sdpa_err = errors(sdpa, dense_ref)
            dense = RingDilatedAttentionFlash([n], [1])
            dilated = RingDilatedAttentionFlash(segments, rates)
            results = {
                "dense": errors(partial(dense, is_causal=causal), dense_ref),
                "dilated": errors(partial(dilated, is_causal=causal), dilated_ref),
            }
            from ring_flash.fused import fused_dilated_attention

            backend = ring_core.select_kernel(RingDilatedAttentionFlash.request(q64.to(dtype), k64.to(dtype), causal))
            fp32 = partial(fused_dilated_attention, backend=backend, scale=d**-0.5, segment_lengths=segments,
                           dilation_rates=rates, is_causal=causal, accumulate_fp32=True)  # fmt: skip
            results["dilated, fp32 accumulators"] = errors(lambda q, k, v, fp32=fp32: fp32(q, k, v)[0], dilated_ref)
            for name, errs in results.items():
                rows.append({
                    "dtype": str(dtype).replace("torch.", ""), "causal": causal, "config": name, **errs,
                    "sdpa_out": sdpa_err["out"], "out_over_sdpa": errs["out"] / sdpa_err["out"],
                    "passes": errs["out"] <= min(1e-2, 2 * sdpa_err["out"]) and max(errs["dq"], errs["dk"], errs["dv"]) <= 2e-2,
                })  # fmt: skip
            del dense_ref, dilated_ref
            torch.cuda.empty_cache()
    return {
        "config": {"B": 1, "N": n, "H": h, "D": d, "segments": segments, "rates": rates},
        "limits": "out <= 1e-2 and <= 2x SDPA's error; each gradient <= 2e-2",
        "rows": rows,
    }


# -- output ------------------------------------------------------------------------------------


def plot(path: Path, report: dict) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no matplotlib: plot skipped"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = [r for r in report.get("dilated", {}).get("rows", []) if "ms" in r]
    for offset, causal in ((0, False), (1, True)):
        sub = [r for r in rows if r["causal"] == causal]
        axes[0].bar([i * 2.5 + offset for i in range(len(sub))], [r["ms"] for r in sub], width=0.9,
                    label="causal" if causal else "non-causal")  # fmt: skip
        names = [r["name"] for r in sub]
    if rows:
        axes[0].set_xticks([i * 2.5 + 0.5 for i in range(len(names))], names, rotation=15, fontsize=7)
    axes[0].set_ylabel("forward+backward ms")
    axes[0].set_title(f"dilated {SEGMENTS}/{RATES}, N={report.get('dilated', {}).get('config', {}).get('N')}",
                      fontsize=9)  # fmt: skip
    axes[0].legend()
    dense = report.get("dense", {}).get("rows", [])
    for causal in (False, True):
        sub = [r for r in dense if r["causal"] == causal]
        axes[1].plot([r["N"] for r in sub], [r["ours_over_sdpa"] for r in sub], marker="o",
                     label=f"ours / SDPA cuDNN ({'causal' if causal else 'non-causal'})")  # fmt: skip
    axes[1].axhline(1.03, color="red", linestyle="--", label="target 1.03")
    axes[1].set_xscale("log", base=2)
    axes[1].set_title("dense: time ratio to SDPA cuDNN", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.suptitle(report["card"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def summary(report: dict) -> str:
    from ring_core.testing import format_table

    lines = [f"card: {report['card']}  torch {report['torch']}  cuDNN {report['cudnn']}"]
    if "measured_order" in report.get("kernels", {}):
        k = report["kernels"]
        lines.append(f"kernels measured fastest first: {k['measured_order']} (priority order {k['priority_order']})")
    rows = []
    for r in report.get("dilated", {}).get("rows", []):
        if "ms" in r:
            rows.append(("dilated 64K", r["name"], "causal" if r["causal"] else "full",
                         f"{r['ms']:.2f} ms (host {r.get('host_ms', float('nan')):.2f})",
                         f"{r['tflops']:.0f} TF/s", f"bare/ours {r['bare_over_ours']:.3f}"))  # fmt: skip
        else:
            rows.append(("dilated 64K", r["name"], "causal" if r["causal"] else "full", "error", r["error"][:60], ""))
    for r in report.get("dense", {}).get("rows", []):
        rows.append((f"dense N={r['N']}", "ours vs SDPA cuDNN", "causal" if r["causal"] else "full",
                     f"{r['ours_ms']:.2f} / {r['sdpa_cudnn_ms']:.2f} ms", f"{r['ours_tflops']:.0f} TF/s",
                     f"ours/sdpa {r['ours_over_sdpa']:.3f}"))  # fmt: skip
        if "ours_graph_ms" in r:
            rows.append((f"dense N={r['N']}", "CUDA graphs: ours vs SDPA", "causal" if r["causal"] else "full",
                         f"{r['ours_graph_ms']:.2f} / {r['sdpa_graph_ms']:.2f} ms",
                         f"host {r['ours_host_ms']:.2f} / {r['sdpa_host_ms']:.2f} ms",
                         f"ours/sdpa {r['ours_graph_ms'] / r['sdpa_graph_ms']:.3f}"))  # fmt: skip
    for name in SECTIONS:
        if "error" in report.get(name, {}):
            lines.append(f"{name}: ERROR {report[name]['error'][:200]}")
    mem = report.get("memory", {})
    if "card_gib" in mem:
        at = mem.get("at_target")
        rows.append(("memory H=8", f"N={mem['target_N']:,}", "full", f"peak {at['peak_gib']:.1f} GiB" if at else "OOM",
                     f"{at['seconds']:.2f} s" if at else "", f"card {mem['card_gib']:.0f} GiB"))  # fmt: skip
        big = mem.get("largest")
        if big:
            rows.append(("memory H=8", f"largest N={big['N']:,}", "full", f"peak {big['peak_gib']:.1f} GiB",
                         f"{big['seconds']:.2f} s", ""))  # fmt: skip
    for r in report.get("accuracy", {}).get("rows", []):
        rows.append((f"accuracy {r['dtype']}", r["config"], "causal" if r["causal"] else "full",
                     f"out {r['out']:.2e} (sdpa {r['sdpa_out']:.2e})",
                     f"grads {max(r['dq'], r['dk'], r['dv']):.2e}",
                     f"x{r['out_over_sdpa']:.2f} {'ok' if r['passes'] else 'FAIL'}"))  # fmt: skip
    lines.append(format_table(rows, ["what", "who", "mask", "value", "rate", "ratio"]))
    profiles = {**report.get("dilated", {}).get("profiles", {}), **report.get("dense", {}).get("profiles", {})}
    for name, top in profiles.items():
        lines.append(
            f"GPU time of one step, {name}: "
            + "; ".join(f"{r['kernel'][:40]} {r['ms']:.2f} ms x{r['calls']}" for r in top[:8])
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--dense-lens", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--memory-target", type=int, default=4_194_304)
    parser.add_argument("--memory-step", type=int, default=65536)
    parser.add_argument("--accuracy-len", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--profile", action="store_true", help="GPU kernel breakdown of one dilated and one dense step")
    parser.add_argument("--merge", action="store_true", help="keep the sections already in the JSON (one process each)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tools.bench.flash_dilated needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.quick:
        args.seq_len, args.dense_lens, args.iters = 16384, [4096], 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "flash_dilated.json"
    report = json.loads(path.read_text()) if args.merge and path.exists() else {}
    report |= {
        "card": torch.cuda.get_device_name(0),
        "capability": torch.cuda.get_device_capability(0),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "kernel_order": [(k.name, k.priority) for k in ring_core.list_kernels()],
    }
    sections = {"kernels": bench_kernels, "dilated": bench_dilated, "dense": bench_dense, "memory": bench_memory,
                "accuracy": bench_accuracy}  # fmt: skip
    for name in filter(None, args.sections.split(",")):
        begin = time.perf_counter()
        try:
            report[name] = sections[name](args)
        except Exception as exc:
            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"[{name}] {time.perf_counter() - begin:.1f} s", flush=True)
        path.write_text(json.dumps(report, indent=2, default=str))
    if not args.sections:  # the last call of a --merge series: plot everything
        try:
            report["plot"] = plot(out / "flash_dilated.png", report)
        except Exception as exc:
            report["plot"] = f"plot failed: {type(exc).__name__}: {exc}"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
