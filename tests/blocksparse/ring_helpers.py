"""What the strip rings' gloo tests share: one rank's run on its shard, and the check of its rows."""

from __future__ import annotations

from typing import Any

import torch

from ring_core.sharding import shard_positions, shard_sequence


def ring_inputs(
    seed: int, batch: int, seq_len: int, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global float64 ``(q, k, v, dout)`` of head dim 4, the same on every rank for one ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(batch, seq_len, heads, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(batch, seq_len, kv_heads, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    return q, k, v, dout


def run_shard(attn: Any, inputs: tuple[torch.Tensor, ...], rank: int, world_size: int, layout: str, **forward: Any):
    """This rank's shard of the global ``(q, k, v, dout)``, forward (``forward``: its other arguments, sharded
    already) and backward: the results as the parent process receives them."""
    q, k, v, dout = inputs
    local = [shard_sequence(x, layout, rank=rank, world_size=world_size).clone().requires_grad_() for x in (q, k, v)]
    out = attn(*local, **forward)
    out.backward(shard_sequence(dout, layout, rank=rank, world_size=world_size))
    return {
        "out": out.detach().numpy(),
        "grads": [x.grad.numpy() for x in local],
        "sent": dict(attn.comm_stats.sent),
        "method": attn.last_method,
    }


def assert_rows_match(
    result: dict, out: torch.Tensor, grads: list[torch.Tensor], rank: int, world_size: int, layout: str
) -> None:
    """One rank's result (:func:`run_shard`, on the strips) equals its rows of the reference ``out`` and ``grads``."""
    assert result["method"] == "flex"
    rows = shard_positions(out.shape[1], rank, world_size, layout)
    torch.testing.assert_close(torch.from_numpy(result["out"]), out.detach()[:, rows], rtol=1e-10, atol=1e-12)
    for grad, ref in zip(result["grads"], grads):
        torch.testing.assert_close(torch.from_numpy(grad), ref[:, rows], rtol=1e-9, atol=1e-11)
