"""Timing of attention implementations against plain SDPA (used by ``ring-attention bench``).

Per row: the kernel that ran (the backends :func:`~ring_core.dispatch.select_kernel`
returned; for the SDPA baseline, the backend PyTorch's dispatcher picks),
forward+backward time (median), the speed-up over SDPA at the same length (SDPA's
time / this time: above 1 is faster), useful TFLOP/s (only the query/key pairs the
pattern allows, forward 4*D per pair and forward+backward 3.5x that) and peak
memory above what was allocated before the step: the CUDA allocator's peak on a
GPU; on the CPU, the peak of the CPU allocator's running total, read from the
allocation events of one profiled step.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .dilated import branches, dilated_parts
from .dispatch import record_kernel_choices

__all__ = [
    "BenchResult",
    "cpu_peak_bytes",
    "dense_pairs",
    "device_name",
    "format_results",
    "fwd_bwd",
    "fwd_bwd_flops",
    "measure",
    "plot",
    "sdpa_kernel_name",
    "time_fwd_bwd",
    "useful_pairs",
    "write_json",
]

_FWD_BWD_FACTOR = 3.5


def useful_pairs(
    seq_len: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    merge: str = "lse",
    causal: bool = False,
) -> int:
    """Query/key pairs computed by dilated attention, summed over heads and branches."""
    total = 0
    for branch in branches(segment_lengths, dilation_rates, merge, num_heads):
        for part in dilated_parts(seq_len, branch, 1, torch.device("cpu")):
            heads = len(range(part.heads.start, part.heads.stop, part.heads.step))
            per_segment = part.length * (part.length + 1) // 2 if causal else part.length**2
            total += heads * (part.stop - part.start) // part.length * per_segment
    return total


def packed_cu_seqlens(seq_len: int, documents: int, seed: int = 0) -> torch.Tensor:
    """``cu_seqlens`` of ``documents`` random lengths (``seed``) that fill ``seq_len`` positions."""
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq_len - 1, generator=generator)[: documents - 1] + 1
    return torch.cat([torch.tensor([0]), cuts.sort().values, torch.tensor([seq_len])])


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and core count (for benchmark metadata)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def dense_pairs(seq_len: int, num_heads: int, causal: bool = False) -> int:
    return num_heads * (seq_len * (seq_len + 1) // 2 if causal else seq_len**2)


def fwd_bwd_flops(pairs: int, head_dim: int, batch: int) -> float:
    """Floating-point operations of forward+backward over ``pairs`` query/key pairs (summed over heads)."""
    return _FWD_BWD_FACTOR * 4 * head_dim * pairs * batch


@dataclass
class BenchResult:
    name: str
    kernel: str
    seq_len: int
    time_ms: float
    tflops: float
    peak_mem_mib: float | None  # None: not measurable here
    speedup_vs_sdpa: float | None = None  # SDPA's time / this time: > 1 is faster than SDPA


def sdpa_kernel_name(q: torch.Tensor, causal: bool) -> str:
    """The SDPA backend PyTorch's dispatcher picks for ``q`` (``(B, H, N, D)``), e.g. ``"sdpa flash"``."""
    from torch.nn.attention import SDPBackend

    try:
        backend = SDPBackend(torch._fused_sdp_choice(q, q, q, None, 0.0, causal))
    except (AttributeError, RuntimeError, ValueError):  # a private API: name what is certain
        return "sdpa"
    return "sdpa " + backend.name.lower().removesuffix("_attention")


def fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One step: ``fn()`` forward, then backward with a gradient of ones."""

    def step() -> None:
        out = fn()
        out.backward(torch.ones_like(out))

    return step


def time_fwd_bwd(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn().backward(grad)`` over ``repeats`` runs (after one warm-up run)."""
    step = fwd_bwd(fn)
    step()
    times: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            step()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


@contextmanager
def _without_profiler_log() -> Iterator[None]:
    """Hide the profiler's start/stop lines (written by C++ straight to file descriptor 2); keep the rest."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedded interpreter): leave it alone
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines()
            kept = [line for line in lines if not line.startswith("USDT:") or "profiler_st" not in line]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def cpu_peak_bytes(step: Callable[[], object]) -> int | None:
    """Peak bytes the CPU allocator held during ``step`` above its level before it (None if unreadable).

    One profiled run (``profile_memory=True``): every CPU allocation and free is an event carrying
    the allocator's running total, so the peak is exact, including memory freed and reused within
    the step (which sampling the resident set misses).
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        with _without_profiler_log(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, RuntimeError):
        return None
    events: list[tuple[int, int, int]] = []  # (time, bytes allocated, running total)
    stack = list(tree)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        fields = node.extra_fields
        if hasattr(fields, "total_allocated") and str(getattr(fields, "device", "cpu")).startswith("cpu"):
            events.append((node.start_time_ns, fields.alloc_size, fields.total_allocated))
    if not events:
        return 0
    events.sort()
    before = events[0][2] - events[0][1]
    return max(0, max(total for _, _, total in events) - before)


def measure(
    name: str,
    fn: Callable[[], torch.Tensor],
    pairs: int,
    head_dim: int,
    batch: int,
    seq_len: int,
    device: torch.device,
    repeats: int,
    kernel: str | None = None,
) -> BenchResult:
    """Time ``fn`` forward+backward, record the kernels it selected (unless ``kernel`` names it) and its peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with record_kernel_choices() as chosen:
        seconds = time_fwd_bwd(fn, device, repeats)
    peak: int | None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = cpu_peak_bytes(fwd_bwd(fn))
    kernel = kernel or "+".join(dict.fromkeys(chosen)) or "not reported"
    flops = fwd_bwd_flops(pairs, head_dim, batch)
    mib = None if peak is None else peak / 2**20
    return BenchResult(name, kernel, seq_len, seconds * 1e3, flops / seconds / 1e12, mib)


HEADER = ("implementation", "kernel", "N", "time (ms)", "speed-up vs SDPA", "TFLOP/s", "peak (MiB)")
LEGEND = (
    "speed-up vs SDPA: SDPA's time / this time at the same N (> 1: faster than SDPA). "
    "TFLOP/s: useful, only the query/key pairs the pattern allows. "
    "peak: allocator peak above the memory held before the step."
)


def format_results(results: Sequence[BenchResult], title: str, width: int = 100) -> str:
    """The results as a table no wider than ``width``, with the title and the legend wrapped to it."""
    from .testing import format_table

    def cell(row: BenchResult) -> tuple[str, ...]:
        speedup = "-" if row.speedup_vs_sdpa is None else f"{row.speedup_vs_sdpa:.2f}x"
        peak = "n/a" if row.peak_mem_mib is None else f"{row.peak_mem_mib:.0f}"
        return (row.name, row.kernel, str(row.seq_len), f"{row.time_ms:.2f}", speedup, f"{row.tflops:.3f}", peak)

    rows = [cell(r) for r in results]
    fixed = sum(max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER) if i != 1)
    room = max(len(HEADER[1]), width - fixed - 2 * (len(HEADER) - 1))
    rows = [(r[0], r[1] if len(r[1]) <= room else r[1][: room - 1] + "~", *r[2:]) for r in rows]
    text = [*_wrap(title, width), format_table(rows, HEADER), *_wrap(LEGEND, width)]
    return "\n".join(text)


def _wrap(text: str, width: int) -> list[str]:
    """``textwrap.wrap`` that never breaks inside ``[...]`` (a list of segment lengths stays on one line)."""
    kept = re.sub(r"\[[^\]]*\]", lambda m: m[0].replace(" ", "\xa0"), text)
    return [line.replace("\xa0", " ") for line in textwrap.wrap(kept, width)]


def write_json(path: str | Path, meta: dict[str, Any], results: Sequence[BenchResult]) -> None:
    import json

    Path(path).write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))


def plot(path: str | Path, results: Sequence[BenchResult], title: str) -> None:
    """Time vs sequence length per implementation (log-log)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # optional dependency
        raise RuntimeError('--plot needs matplotlib: pip install "ring-core[plot]"') from exc
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r.name for r in results):
        rows = [r for r in results if r.name == name]
        kernels = ", ".join(dict.fromkeys(r.kernel for r in rows))
        ax.plot([r.seq_len for r in rows], [r.time_ms for r in rows], marker="o", label=f"{name} ({kernels})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward+backward time (ms)")
    ax.set_title("\n".join(_wrap(title, 70)), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
