"""The ring with documents crossing shards: 2 gloo processes, what each rank sends (a test runs it)."""

import torch

from ring_core import RingDilatedAttention, reference_attention, shard_sequence
from ring_core.testing import run_gloo

N, H, D = 64, 4, 16
# global: every rank passes the same tensor; [20, 40) crosses 32
CU_SEQLENS = torch.tensor([0, 20, 40, 64])


def rank_main(rank: int, world_size: int) -> tuple[int, float]:
    seeds = [torch.Generator().manual_seed(i) for i in range(3)]
    q, k, v = (
        torch.randn(1, N, H, D, dtype=torch.float64, generator=g)
        for g in seeds
    )
    # a causal window of 4 positions
    attn = RingDilatedAttention([N], [1], window_size=(4, 0))
    shards = (shard_sequence(x) for x in (q, k, v))
    out = attn(*shards, is_causal=True, cu_seqlens=CU_SEQLENS)
    expected = reference_attention(
        q, k, v, is_causal=True, window_size=(4, 0), cu_seqlens=CU_SEQLENS
    )
    error = (out - shard_sequence(expected)).abs().max().item()
    return attn.comm_stats.forward_bytes, error


if __name__ == "__main__":
    for rank, (sent, error) in enumerate(run_gloo(rank_main, 2)):
        rows = sent // (H * 2 * D * 8)  # k and v rows of every head, float64
        print(f"rank {rank}: sent {rows} rows, max error {error:.1e}")
