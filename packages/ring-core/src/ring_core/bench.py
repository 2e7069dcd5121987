"""Timing of attention implementations against plain SDPA (used by ``ring-attention bench``).

Forward+backward time (median), useful TFLOP/s (only the query/key pairs the
pattern allows, forward 4*D per pair and forward+backward 3.5x that) and peak
memory (CUDA allocator peak; on the CPU, the peak resident set above the
baseline, sampled every millisecond).
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .dilated import branches, dilated_parts

__all__ = [
    "BenchResult",
    "dense_pairs",
    "device_name",
    "measure",
    "plot",
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


class _PeakRSS:
    """Samples this process's resident set size in a thread (CPU peak memory)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        except OSError:  # not Linux: no sampling
            return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.001)

    def __enter__(self) -> _PeakRSS:
        self.base = self.rss()
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class BenchResult:
    name: str
    seq_len: int
    time_ms: float
    tflops: float
    peak_mem_mib: float
    ratio_to_sdpa: float | None = None


def time_fwd_bwd(fn: Callable[[], torch.Tensor], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn().backward(grad)`` over ``repeats`` runs."""

    def step() -> None:
        out = fn()
        out.backward(torch.ones_like(out))

    for _ in range(warmup):
        step()
    times = []
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


def measure(
    name: str,
    fn: Callable[[], torch.Tensor],
    pairs: int,
    head_dim: int,
    batch: int,
    seq_len: int,
    device: torch.device,
    repeats: int,
) -> BenchResult:
    """Time ``fn`` forward+backward and record its peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        seconds = time_fwd_bwd(fn, device, repeats)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        with _PeakRSS() as sampler:
            seconds = time_fwd_bwd(fn, device, repeats)
        peak = sampler.peak - sampler.base
    flops = _FWD_BWD_FACTOR * 4 * head_dim * pairs * batch
    return BenchResult(name, seq_len, seconds * 1e3, flops / seconds / 1e12, peak / 2**20)


def write_json(path: str | Path, meta: dict, results: Sequence[BenchResult]) -> None:
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
        ax.plot([r.seq_len for r in rows], [r.time_ms for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward+backward time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
