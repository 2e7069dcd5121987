"""Where one strip step's host time goes: the band + dilated rows of ``blocksparse_strips`` (causal), unpacked and
with packed documents, one forward+backward each (``--layout random``, ``--mask full``: the random + dilated rows).

    python -m tools.bench.strips_host --ring 4 --json /tmp/strips-host.json
    python -m tools.bench.strips_host --quick          # tiny sizes on the CPU: checks the script

With ``--ring P``, rank 1's steps of a sparse ring of ``P`` ranks simulated on one GPU (as ``blocksparse_strips
--ring``) and the same tiles' kernels alone are two more rows. Per row: the step's wall time (host clock around a
synchronized step, median) against the GPU time of its kernels (torch.profiler), the aten ops, kernel launches and
host-device synchronizations of one step (each sync with the innermost frames of this project that caused it:
``torch.cuda.set_sync_debug_mode``), and the project's functions by cumulative host time (cProfile). A step whose
wall time exceeds its kernels' time is host-bound: the ops, launches and syncs say why. A profile, not a benchmark:
nothing to publish, no baseline ratio.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pstats
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch

from ring_blocksparse import BlockSparseRingDilatedAttention, Random
from ring_blocksparse.attention import dense_strip_kernel
from tools import command_line
from tools.bench.blocksparse_strips import (
    add_shape_arguments,
    band,
    kernels_alone,
    packed_documents,
    rank_steps,
    ring_rank,
    ring_shards,
)

SPARSE = {"cuda": "auto", "cpu": "math"}  # the strips' kernels: the CPU runs their math twin (--quick)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=25, help="functions listed by cumulative host time")
    parser.add_argument("--rows", nargs="+", default=["unpacked", "packed"], choices=["unpacked", "packed"])
    parser.add_argument("--ring", type=int, default=0, help="also one rank's sparse ring steps of this many ranks")
    parser.add_argument("--layout", choices=["band", "random"], default="band", help="the rows' layout at density 0.1")
    parser.add_argument("--mask", choices=["causal", "full"], default="causal", help="the rows' causality")
    parser.add_argument("--json", default="strips-host.json")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes on the CPU (the strips' math twin): checks the script"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.heads, args.head_dim, args.block_size = 2048, 4, 16, 64
        args.segments, args.repeats = [256, 512, 1024], 2
    device = torch.device("cpu" if args.quick else "cuda")
    n, h, dtype = args.seq_len, args.heads, torch.float32 if args.quick else torch.bfloat16
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, dout = (
        torch.randn(1, n, h, args.head_dim, device=device, dtype=dtype, generator=generator) for _ in range(4)
    )
    for x in (q, k, v):
        x.requires_grad_()
    layout = {"band": band, "random": lambda d, n, b: Random(density=d, seed=0).layout(n, b)}[args.layout](
        0.1, n, args.block_size
    )
    causal = args.mask == "causal"
    documents = packed_documents(n, max(args.rates))
    record = {"card": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__, "command": command_line(),
              "documents": len(documents) - 1, "rows": []}  # fmt: skip
    rows = []
    for name, cu in (("unpacked", None), ("packed", torch.tensor(documents, dtype=torch.int32, device=device))):
        if name not in args.rows:
            continue
        attn = BlockSparseRingDilatedAttention(
            args.segments, args.rates, block_size=args.block_size, block_layout=layout, method="flex"
        )
        attn.sparse_kernel = SPARSE[device.type]
        options = {} if cu is None else {"cu_seqlens": cu}

        def step(attn=attn, options=options) -> None:
            out = attn(q, k, v, is_causal=causal, **options)
            torch.autograd.grad(out, (q, k, v), dout)

        rows.append((name, step))
    if args.ring:
        rows += ring_steps(args, q, k, v, dout)
    for name, step in rows:
        step()  # plan, compile
        synchronize(device)
        row = {"name": name, **wall_and_kernels(step, args.repeats, device)}
        row["syncs"] = syncs(step) if device.type == "cuda" else []
        row["host_functions"] = host_functions(step, args.top, device)
        record["rows"].append(row)
        print(
            f"{name:9s} wall {row['wall_ms']:7.2f} ms  kernels {row['kernel_ms']:7.2f} ms  aten ops "
            f"{row['aten_ops']:6d}  launches {row['launches']:5d}  syncs {len(row['syncs'])}  (wall / kernels "
            + (f"{row['wall_ms'] / row['kernel_ms']:.2f})" if row["kernel_ms"] else "n/a: no GPU)"),
            flush=True,
        )
        for where, count in collections.Counter(row["syncs"]).most_common():
            print(f"    sync x{count}: {where}")
        for kernel, (ms, count) in list(row["top_kernels"].items())[:10]:
            print(f"    kernel {ms:8.2f} ms x{count:4d}  {kernel}")
        for entry in row["host_functions"][:12]:
            print(f"    {entry['cumulative_ms']:8.2f} ms  {entry['calls']:6d} calls  {entry['function']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


def ring_steps(args, q, k, v, dout) -> list:
    """Rank 1's steps of the sparse ring of ``--ring`` ranks (random 10%, one rate-1 branch, as in ``blocksparse_strips
    --ring``) simulated on one GPU, and the same tiles' kernels alone."""
    layout = Random(density=0.1, seed=0).layout(args.seq_len, args.block_size)
    kernel = dense_strip_kernel(q, False, q.shape[-1] ** -0.5, None)
    _, local = ring_shards((q, k, v, dout), args.ring)
    run = ring_rank(local, 1, layout, kernel, block=args.block_size, sparse=SPARSE[q.device.type])
    rank_steps(*run, backward=True)
    return [("ring steps", lambda: rank_steps(*run, backward=True)), ("ring kernels", kernels_alone(*run))]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_and_kernels(step, repeats: int, device: torch.device) -> dict:
    """Median host wall time of a synchronized step; one step's kernel time and launches from the profiler."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - begin) * 1e3)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        synchronize(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = [e for e in events if "LaunchKernel" in e.name]
    runtime = collections.Counter(e.name for e in events if e.name in SYNC_CALLS)
    ops = collections.Counter(e.name for e in events if e.name.startswith("aten::"))
    by_kernel: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_kernel[e.name[:90]][0] += e.device_time / 1e3
        by_kernel[e.name[:90]][1] += 1
    top = sorted(by_kernel.items(), key=lambda item: -item[1][0])[:25]
    return {
        "wall_ms": statistics.median(times),
        "aten_ops": sum(ops.values()),
        "top_aten_ops": dict(ops.most_common(20)),
        "kernel_ms": sum(e.device_time for e in kernels) / 1e3,
        "kernels": len(kernels),
        "top_kernels": {name: (round(ms, 3), int(count)) for name, (ms, count) in top},
        "launches": len(launches),
        "sync_calls": dict(runtime),
    }


def syncs(step) -> list[str]:
    """Each synchronization of one step, as the innermost project frame (file:line function) that caused it."""
    seen: list[str] = []

    def record(*_args, **_kwargs) -> None:
        frames = [f for f in traceback.extract_stack() if "ring_" in f.filename and "strips_host" not in f.filename]
        seen.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-1:-4:-1]) or "?")

    original = warnings.showwarning
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            step()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = original
    return seen


def host_functions(step, top: int, device: torch.device) -> list[dict]:
    """The project's functions (and torch's flex_attention entry) by cumulative host time over one step."""
    profile = cProfile.Profile()
    synchronize(device)
    profile.enable()
    step()
    synchronize(device)
    profile.disable()
    stats = pstats.Stats(profile)
    entries = []
    for (filename, line, function), (_, calls, _, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "ring_" in filename or function in ("flex_attention", "from_kv_blocks", "synchronize"):
            entries.append({"function": f"{Path(filename).name}:{line} {function}", "calls": calls,
                            "cumulative_ms": cumulative * 1e3})  # fmt: skip
    entries.sort(key=lambda e: -e["cumulative_ms"])
    return entries[:top]


if __name__ == "__main__":
    raise SystemExit(main())
