"""Simulate a ring of P ranks on one device and measure the peak memory of each rank.

    python examples/ring_attention/single_gpu_simulation.py                  # CPU, P=4, N = 512, 1024, 2048
    python examples/ring_attention/single_gpu_simulation.py --device cuda --seq-lens 4096 8192

No process group: the ranks run one after another on one device, each executing the
ring schedule of ``reference_implementation.py`` (same ``block_attention`` and ``merge``)
with the messages replaced by copies. Rank ``r`` starts with its shard of Q, K, V; at
step ``s`` it computes with the K/V of rank ``(r - s) mod P`` while the next block
"arrives" (a copy into a fresh buffer, as a receive would fill one).

Memory is measured, not estimated: a ``TorchDispatchMode`` sees every tensor the
computation allocates and counts the bytes of the storages alive at each moment; a
rank's peak covers its own shards, the K/V block in hand and the one arriving, the
``(N/P) x (N/P)`` scores of one block and the running output. Full attention, as a naive
implementation computes it, holds Q, K, V whole and materialises ``N x N`` scores, so
its peak grows as ``N^2`` while a rank of the ring needs about ``P^2`` times less for the
scores (and ``P`` times less for everything else).

The output of the simulated ring is checked against ``ring_core.reference_attention``
(float64, relative error at most 1e-10, else exit status 1). Forward only, dense,
non-causal. ``--corrupt-merge`` breaks one merge on purpose (for the tests).
"""

from __future__ import annotations

import argparse
import math
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reference_implementation.py sits beside this file
from reference_implementation import TOLERANCE, block_attention, merge

from ring_core import reference_attention


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages allocated inside the ``with`` block while they are alive.

    Tensors created before the block (the other ranks' shards) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = id(storage)  # views share the storage object: counted once
                if storage.nbytes() and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._release, key)
        return out


def simulate_rank(
    rank: int, qs: list[torch.Tensor], ks: list[torch.Tensor], vs: list[torch.Tensor], corrupt_merge: bool = False
) -> torch.Tensor:
    """Rank ``rank``'s output shard, computed with the ring schedule; ``qs[p]`` etc. are rank ``p``'s shards."""
    world_size = len(qs)
    q = qs[rank].clone()  # this rank's own memory starts with its shards
    kv = torch.stack([ks[rank], vs[rank]])
    out = lse = None
    for step in range(world_size):
        last = step == world_size - 1
        if not last:  # the block of rank (r - s - 1) arrives while this one is in use
            source = (rank - step - 1) % world_size
            incoming = torch.stack([ks[source], vs[source]])
        block_out, block_lse = block_attention(q, kv[0], kv[1])
        if out is None:
            out, lse = block_out, block_lse
        else:
            corrupt = corrupt_merge and last and rank == world_size - 1
            out, lse = merge(out, lse, block_out, block_lse, corrupt)
        del block_out, block_lse
        if not last:
            kv = incoming
    return out


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Naive attention: the whole ``(B, H, N, N)`` score matrix, then softmax."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", scores.softmax(dim=-1), v)


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=4, help="simulated ranks P")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048], help="global lengths N")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt-merge", action="store_true", help="break one merge on purpose (for the tests)")
    args = parser.parse_args()
    world_size = args.world_size
    if world_size < 1:
        parser.error(f"--world-size must be >= 1, got {world_size}")
    bad = [n for n in args.seq_lens if n < 1 or n % world_size]
    if bad:
        parser.error(f"--seq-lens must be positive multiples of --world-size {world_size}, got {bad}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    torch.manual_seed(args.seed)

    b, h, d, itemsize = args.batch, args.heads, args.head_dim, torch.float64.itemsize
    print(
        f"ring attention simulated on {device}: P={world_size} ranks, B={b} H={h} D={d} float64, dense, forward only\n"
        "peak = the most bytes of live tensors during the computation (ring: worst rank); "
        "scores = bytes of one score matrix\n"
    )
    header = ("N", "full peak MiB", "ring peak/rank MiB", "ratio", "full scores MiB", "block scores MiB", "error")
    print("  ".join(f"{name:>{max(len(name), 7)}}" for name in header))
    worst = 0.0
    for n in args.seq_lens:
        q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64, device=device) for _ in range(3))
        with PeakMemory() as full:
            full_attention(q.clone(), k.clone(), v.clone())  # one device holding everything
        qs, ks, vs = (x.chunk(world_size, dim=1) for x in (q, k, v))
        outs, ring_peak = [], 0
        for rank in range(world_size):
            with PeakMemory() as memory:
                out = simulate_rank(rank, qs, ks, vs, args.corrupt_merge)
            ring_peak = max(ring_peak, memory.peak)
            outs.append(out)
        reference = reference_attention(q, k, v)
        error = (torch.cat(outs, dim=1) - reference).norm().item() / reference.norm().item()
        worst = max(worst, error)
        row = (
            n,
            mib(full.peak),
            mib(ring_peak),
            f"{full.peak / ring_peak:.1f}x",
            mib(b * h * n * n * itemsize),
            mib(b * h * (n // world_size) ** 2 * itemsize),
            f"{error:.1e}",
        )
        print("  ".join(f"{value!s:>{max(len(name), 7)}}" for value, name in zip(row, header)), flush=True)
    ok = worst <= TOLERANCE
    print(f"\n{'PASS' if ok else 'FAIL'}: worst error vs reference_attention {worst:.2e}, tolerance {TOLERANCE:.0e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
