"""Ring attention in one short file, for reading: plain ``torch.distributed`` point-to-point messages.

    torchrun --nproc_per_node 2 examples/ring_attention/reference_implementation.py
    python examples/ring_attention/reference_implementation.py --world-size 2   # spawns 2 gloo processes

Forward only (no backward), dense attention (non-causal and causal), contiguous layout,
float64 on the CPU. The library's ``ring_core.RingDilatedAttention`` does the same and
more (backward, zigzag layout, dilated segments, overlap on CUDA); this file shows the idea.

The sequence of length ``N`` is cut into ``P`` shards: rank ``r`` holds rows
``[r*N/P, (r+1)*N/P)`` of Q, K and V, in the (B, N, H, D) layout. Each rank keeps its
queries and passes keys and values around a ring: at step ``s`` rank ``r`` holds the K/V
of rank ``(r - s) mod P``, sends it to rank ``r + 1`` and receives the next one from rank
``r - 1`` while it computes. After ``P`` steps every query has seen every key, and no rank
ever held more than two K/V shards or an ``(N/P) x (N/P)`` block of scores.

Each block gives a partial softmax: its output ``O_i`` (normalised over the block's keys)
and the log-sum-exp ``L_i`` of its scores. Two partial results merge exactly:

    L = log(exp(L_1) + exp(L_2))
    O = exp(L_1 - L) * O_1 + exp(L_2 - L) * O_2

With ``is_causal`` a key is visible to a query iff its global position is not later:
blocks from ranks after this one are skipped, the block from this rank gets a lower
triangular mask, blocks from earlier ranks are fully visible.

The script checks its output against ``ring_core.reference_attention`` on the gathered
inputs and against ``ring_core.RingDilatedAttention`` on the same shards, prints the
relative errors (over all ranks) and exits with status 1 if one is above 1e-10.
``--corrupt-merge`` breaks one merge on purpose (the tests use it to see the check fail).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.distributed as dist

from ring_core import RingDilatedAttention, reference_attention
from ring_core.testing import spawn_group

TOLERANCE = 1e-10  # float64, SPEC.md


def block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of queries ``(B, n, H, D)`` over one block of keys ``(B, m, H, D)``.

    Returns the block's output ``(B, n, H, D)`` and its log-sum-exp ``(B, H, n)``.
    ``mask`` (``(n, m)``, True = visible) must leave every query at least one key.
    """
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = scores.sub_(lse[..., None]).exp_()  # in place: one (n, m) buffer per block
    out = torch.einsum("bhnm,bmhd->bnhd", probs, v)
    return out, lse


def merge(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor, corrupt: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial softmax results exactly (log-sum-exp weights).

    ``corrupt=True`` is a deliberate bug for the tests: the old output is not rescaled.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    old_weight = torch.exp(lse - new_lse).transpose(1, 2)[..., None]  # (B, H, n) -> (B, n, H, 1)
    new_weight = torch.exp(block_lse - new_lse).transpose(1, 2)[..., None]
    if corrupt:
        old_weight = torch.ones_like(old_weight)
    return old_weight * out + new_weight * block_out, new_lse


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, corrupt_merge: bool = False
) -> torch.Tensor:
    """Attention of this rank's queries over the keys of all ranks; every input is this rank's shard."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    send_to, receive_from = (rank + 1) % world_size, (rank - 1) % world_size
    kv = torch.stack([k, v])  # one message per step carries both
    out = lse = None
    for step in range(world_size):
        source = (rank - step) % world_size  # the rank whose keys we hold now
        last = step == world_size - 1
        if not last:  # pass our block on and fetch the next one while we compute
            incoming = torch.empty_like(kv)
            requests = dist.batch_isend_irecv(
                [dist.P2POp(dist.isend, kv, send_to), dist.P2POp(dist.irecv, incoming, receive_from)]
            )
        if not (is_causal and source > rank):  # with is_causal, later ranks' keys are all in the future
            mask = None
            if is_causal and source == rank:
                n = q.shape[1]
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            block_out, block_lse = block_attention(q, kv[0], kv[1], mask)
            if out is None:  # step 0: our own keys
                out, lse = block_out, block_lse
            else:
                corrupt = corrupt_merge and last and rank == world_size - 1
                out, lse = merge(out, lse, block_out, block_lse, corrupt)
        if not last:
            for request in requests:
                request.wait()
            kv = incoming
    return out


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's shard along the sequence (dim 1)."""
    shards = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(shards, x)
    return torch.cat(shards, dim=1)


def global_relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` over the shards of all ranks (the same on every rank)."""
    sums = torch.stack([(value - reference).pow(2).sum(), reference.pow(2).sum()])
    dist.all_reduce(sums)
    return math.sqrt(sums[0] / sums[1])


def run(args: argparse.Namespace) -> bool:
    """Run the ring on random shards, check it and print the errors on rank 0; True if within tolerance."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    n = args.seq_len // world_size
    generator = torch.Generator().manual_seed(args.seed + rank)  # each rank makes only its own shard
    shape = (args.batch, n, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3))
    rows = slice(rank * n, (rank + 1) * n)
    if rank == 0:
        print(
            f"ring attention over {world_size} ranks (gloo), forward only: B={args.batch} N={args.seq_len} "
            f"H={args.heads} D={args.head_dim} float64, {n} rows per rank",
            flush=True,
        )
    worst = 0.0
    for is_causal in (False, True):
        out = ring_attention(q, k, v, is_causal, args.corrupt_merge)
        reference = reference_attention(gather(q), gather(k), gather(v), is_causal=is_causal)[:, rows]
        library = RingDilatedAttention(segment_lengths=[args.seq_len], dilation_rates=[1])
        library_out = library(q, k, v, is_causal=is_causal)
        err_reference = global_relative_error(out, reference)
        err_library = global_relative_error(out, library_out)
        worst = max(worst, err_reference, err_library)
        if rank == 0:
            print(
                f"is_causal={is_causal!s:5}  error vs reference_attention: {err_reference:.2e}  "
                f"vs RingDilatedAttention: {err_library:.2e}",
                flush=True,
            )
    ok = worst <= TOLERANCE
    if rank == 0:
        print(f"{'PASS' if ok else 'FAIL'}: worst error {worst:.2e}, tolerance {TOLERANCE:.0e}", flush=True)
    dist.barrier()  # rank 0 has printed before any rank exits
    return ok


def spawned(rank: int, world_size: int, args: argparse.Namespace) -> bool:
    """One of ``--world-size`` gloo processes started by :func:`main` (already in the group): run the check."""
    return run(args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    parser.add_argument("--seq-len", type=int, default=256, help="global sequence length N")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corrupt-merge", action="store_true", help="break one merge on purpose (for the tests)")
    args = parser.parse_args()
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # then the group comes from env vars
    world_size = int(os.environ["WORLD_SIZE"]) if torchrun else args.world_size
    if world_size < 1:
        parser.error(f"--world-size must be >= 1, got {world_size}")
    if args.seq_len < 1 or args.seq_len % world_size:
        parser.error(f"--seq-len must be a positive multiple of the world size {world_size}, got {args.seq_len}")
    if torchrun:
        dist.init_process_group("gloo")
        try:
            ok = run(args)
        finally:
            dist.destroy_process_group()
        return 0 if ok else 1
    return 0 if all(spawn_group(spawned, args.world_size, args, timeout=None)) else 1


if __name__ == "__main__":
    sys.exit(main())
