"""Shared scaffolding of the multi-GPU benchmarks (``tools.bench.distributed``, ``tools.bench.ring``).

For each world size P, :func:`main` starts one group of P processes (``ring_core.testing.spawn_group``:
NCCL on CUDA with the NVLS/multicast switches of ``ENV`` off, gloo on the CPU), runs
the tool's sections on every rank, collects rank 0's rows (a dead rank or a timeout becomes
an error row, never a hang), and writes ``<name>.json``, ``<name>.md`` and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from tools import command_line

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
FWD_BWD = 3.5  # forward + backward FLOPs over forward FLOPs of attention

Section = Callable[[int, int, torch.device, bool], list[dict]]  # (rank, world_size, device, quick) -> rows

_T0 = time.monotonic()


def log(rank: int, message: str) -> None:
    """Progress on stderr (rank 0), with seconds since start, so a partial log shows where a run stopped."""
    if rank == 0:
        print(f"[{time.monotonic() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def global_error(parts: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """sqrt(sum ||a - r||^2) / sqrt(sum ||r||^2) over this rank's pieces and all ranks (inf if any is not finite)."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for actual, reference in parts:
        if not torch.isfinite(actual).all():
            sums[0] += float("inf")
        sums[0] += (actual.double() - reference.double()).pow(2).sum()
        sums[1] += reference.double().pow(2).sum()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums[0].sqrt() / sums[1].sqrt()).item()


def max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def median_ms(step: Callable[[], None], iters: int, warmup: int, device: torch.device, together: bool = True) -> float:
    """Median milliseconds of ``step`` after ``warmup`` calls, each started together; the slowest rank's
    (``together=False``: this rank alone, no collective)."""
    together = together and dist.is_initialized()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        if together:
            dist.barrier()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return max_over_ranks(median, device) if together else median


def flops_per_gpu(b: int, n: int, h: int, d: int, segments, rates, causal: bool, world_size: int) -> float:
    """Useful forward+backward FLOPs per GPU of attention over ``n`` tokens (``segments=None``: dense)."""
    from ring_core.bench import dense_pairs, useful_pairs

    pairs = dense_pairs(n, h, causal) if segments is None else useful_pairs(n, h, segments, rates, causal=causal)
    return FWD_BWD * 2 * 2 * b * pairs * d / world_size


def _rank_rows(rank: int, world_size: int, device_type: str, sections: dict[str, Section], quick: bool) -> list[dict]:
    """One rank, already in the group: every section's rows (an exception becomes an error row)."""
    import faulthandler

    faulthandler.enable()  # a hard crash still prints where it happened
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    rows = []
    for name, section in sections.items():
        try:
            rows += section(rank, world_size, device, quick)
        except Exception:
            rows.append({"section": name, "P": world_size, "error": traceback.format_exc()[-1500:]})
    dist.barrier()
    return rows


def run_group(world_size: int, device_type: str, sections: dict[str, Section], quick: bool, timeout: float):
    """Rank 0's rows of one group of ``world_size`` processes (ring-core's spawner), or one error row."""
    from ring_core.testing import DistributedRunError, spawn_group

    backend = "nccl" if device_type == "cuda" else "gloo"
    try:
        results = spawn_group(
            _rank_rows, world_size, device_type, sections, quick, backend=backend, timeout=timeout,
            threads=1 if backend == "gloo" else None,
        )  # fmt: skip
    except DistributedRunError as exc:
        return [{"section": "worker", "P": world_size, "error": str(exc)[-1500:]}]
    return results[0]


def write_reports(out: Path, name: str, rows: list[dict], card: str, markdown, plot) -> str:
    """``<name>.md`` and ``<name>.png`` (a failed plot is reported, not raised); returns the markdown."""
    text = markdown(rows, card)
    (out / f"{name}.md").write_text(text + "\n")
    try:
        plot(rows, out / f"{name}.png", card)
    except Exception as exc:
        print(f"plot failed: {exc}")
    return text


def main(
    argv: list[str] | None,
    *,
    name: str,
    description: str,
    sections: dict[str, Section],
    world_sizes: list[int],
    markdown: Callable[[list[dict], str], str],
    plot: Callable[[list[dict], Path, str], None],
) -> int:
    """The command line of a multi-GPU tool: run the chosen sections for each world size, write and print."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=".")
    parser.add_argument("--world-sizes", nargs="+", type=int, default=world_sizes)
    parser.add_argument("--sections", default=",".join(sections))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--plot-only", help="re-plot (and re-table) from a JSON written before")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per world size")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        data = json.loads(Path(args.plot_only).read_text())
        write_reports(out, name, data["rows"], data["card"], markdown, plot)
        return 0
    os.environ.update(ENV)
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (gloo)"
    quick = args.quick or args.device != "cuda"
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in sections]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; valid: {list(sections)}")
    chosen = {s: sections[s] for s in names}
    rows: list[dict] = []
    for world_size in args.world_sizes:
        if args.device == "cuda" and world_size > torch.cuda.device_count():
            print(f"skip P={world_size}: only {torch.cuda.device_count()} GPUs")
            continue
        got = run_group(world_size, args.device, chosen, quick, args.timeout)
        rows += got
        print(markdown(got, card), flush=True)
        meta = {"card": card, "torch": torch.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
                "command": command_line()}  # fmt: skip
        (out / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print("\n" + write_reports(out, name, rows, card, markdown, plot))
    return 0
