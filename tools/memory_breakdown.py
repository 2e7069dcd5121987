"""What is alive at the peak of one ``ring_dilated_flash`` forward+backward, by the line that allocated it.

    python3 tools/memory_breakdown.py [N]        (default N = 1,048,576; H=8, D=128, bf16, one CUDA GPU)

Runs one step to warm up, then records the CUDA caching allocator's history for a
second step, replays it to find the set of live blocks at the peak and groups them by
block size and the ``ring_*`` source lines that allocated them. Inputs (``q, k, v,
dout``) are the base; ``out`` and ``dq, dk, dv`` are the rest of the floor.
"""

from __future__ import annotations

import collections
import sys

import torch

from ring_flash import RingDilatedAttentionFlash

GIB = 2**30


def live_at_peak(snapshot: dict) -> list[dict]:
    """The allocation events alive when the recorded total was highest."""
    alive: dict[int, dict] = {}
    current = best = 0
    best_set: list[dict] = []
    for event in (e for trace in snapshot["device_traces"] for e in trace):
        if event["action"] == "alloc":
            alive[event["addr"]] = event
            current += event["size"]
            if current > best:
                best, best_set = current, list(alive.values())
        elif event["action"] == "free_completed" and event["addr"] in alive:
            current -= alive.pop(event["addr"])["size"]
    return best_set


def main() -> int:
    if not torch.cuda.is_available():
        print("memory_breakdown.py needs a CUDA GPU", file=sys.stderr)
        return 2
    n, h, d = (int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20), 8, 128
    attn = RingDilatedAttentionFlash([2048, 4096, 8192], [1, 2, 4])
    q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16)
    unit = n * h * d * 2 / GIB
    torch.autograd.grad(attn(q, k, v), (q, k, v), dout)  # warm-up: kernels built, caches filled
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=200_000)
    out = attn(q, k, v)
    forward_peak = torch.cuda.max_memory_allocated()
    torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    print(f"N={n:,} H={h} D={d}: one tensor {unit:.3f} GiB; inputs {base / GIB:.2f} GiB, forward peak "
          f"{forward_peak / GIB:.2f} GiB, peak {peak / GIB:.2f} GiB ({(peak - base) / GIB / unit:.2f} tensors above inputs)")  # fmt: skip
    groups: collections.Counter[str] = collections.Counter()
    for event in live_at_peak(torch.cuda.memory._snapshot()):
        ours = [
            f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}"
            for f in event.get("frames", [])
            if "/ring_" in f["filename"]  # this project's packages only
        ][:3]
        groups[f"{event['size'] / GIB:.3f} GiB each, " + " < ".join(ours)] += event["size"]
    for where, size in groups.most_common(12):
        print(f"{size / GIB:8.3f} GiB  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
