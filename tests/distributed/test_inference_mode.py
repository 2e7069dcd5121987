"""Under ``torch.inference_mode`` (inputs and ``cu_seqlens`` made there: tensors that count no versions) every
implementation that runs on 2 gloo ranks gives, on each rank, what it gives under ``no_grad``."""

from __future__ import annotations

import pytest
import torch

import ring_core
from distributed_helpers import run_distributed
from ring_core import shard_sequence

NAMES = [i.name for i in ring_core.list_implementations("attention") if i.distributed and i.available]
DOCUMENTS = [0, 7, 7, 30, 44]


def _compare(rank: int, world_size: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 44, 4, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    local = [shard_sequence(x, "contiguous", dim=1, rank=rank, world_size=world_size) for x in (q, k, v)]
    errors = {}
    for name in NAMES:
        impl = ring_core.resolve_implementation(name)
        attn = ring_core.create_attention(name, segment_lengths=[4, 8], dilation_rates=[1, 2], **impl.options)
        with torch.no_grad():
            expected = attn(*local, is_causal=True, cu_seqlens=torch.tensor(DOCUMENTS))
        with torch.inference_mode():
            got = attn(*(x.clone() for x in local), is_causal=True, cu_seqlens=torch.tensor(DOCUMENTS))
        errors[name] = float((got - expected).abs().max())
    return errors


@pytest.mark.distributed
def test_inference_mode_equals_no_grad_on_two_ranks():
    for errors in run_distributed(_compare, 2):
        assert errors and all(error <= 1e-12 for error in errors.values()), errors
