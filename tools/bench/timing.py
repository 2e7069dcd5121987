"""Timing shared by the benchmarks: the median milliseconds of one step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(
    step: Callable[[], object],
    *,
    iters: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str = "cuda",
) -> float:
    """Milliseconds per ``step``: ``warmup`` untimed steps, then ``iters`` steps back to back per repeat
    (as in training), median over ``repeats``; CUDA events on a CUDA ``device``, else the host clock."""
    for _ in range(warmup):
        step()
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / iters)
        else:
            begin = time.perf_counter()
            for _ in range(iters):
                step()
            times.append((time.perf_counter() - begin) * 1e3 / iters)
    return statistics.median(times)
