"""The copy-engine transport on 2 and 4 GPUs (an NCCL group inside the gloo test world): exact, the same bytes as
NCCL, in ring-core's ring and in ring-distributed's ``strategy="ring"``. At 4 ranks each call makes three
exchanges per channel, so both slots of each channel are reused within a call. After the first case the slots are
released, so the later cases allocate them again.

Run with nox -s "tests(cuda)" on a machine with 2 or more GPUs; the 4-rank case needs 4.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.distributed as dist

from distributed_helpers import run_distributed
from ring_core import RingDilatedAttention
from ring_core.testing import CASES, fit_case, sharded_case_errors

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

SPANNING = (CASES[1], CASES[3], CASES[4])  # dense causal + padding, dilated causal GQA, dilated + padding: all send


def _modules():
    """``(name, constructor, transport)``: the core ring and ring-distributed's ring strategy, both transports."""
    from ring_distributed import RingDistributedDilatedAttention

    makers = {"core": RingDilatedAttention, "distributed": partial(RingDistributedDilatedAttention, strategy="ring")}
    return [(name, make, transport) for name, make in makers.items() for transport in ("copy_engine", "nccl")]


def _transports(rank, world_size):
    from ring_core import comm

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    group = dist.new_group(backend="nccl")
    rows, released = [], []
    for case in SPANNING:
        for layout in ("contiguous", "zigzag"):
            fitted = fit_case(case, world_size, layout)
            errors, sent = {}, {}
            for name, make, transport in _modules():
                module = make(**fitted.config, layout=layout, process_group=group, transport=transport)

                def on_gpu(q, k, v, *, is_causal, key_padding_mask, module=module):
                    mask = None if key_padding_mask is None else key_padding_mask.to(device)
                    out = module(q.to(device), k.to(device), v.to(device), is_causal=is_causal, key_padding_mask=mask)
                    return out.cpu()

                for call in range(2):  # the second call reuses the slots of the first
                    errors[name, transport, call] = sharded_case_errors(
                        on_gpu, fitted, rank, world_size, layout, seed=call
                    )
                sent[name, transport] = (
                    module.comm_stats.forward_bytes,
                    module.comm_stats.backward_bytes,
                )
            rows.append((case.name, layout, errors, sent))
            if not released:  # the later cases allocate the slots again
                freed = comm.release_copy_engine_slots(group)
                released = [freed] + [c.capacity for slots in comm._SLOTS.values() for c in slots.channels.values()]
    used = [
        (slots.usable, use, channel.capacity, channel.count)
        for slots in comm._SLOTS.values()
        for use, channel in slots.channels.items()
    ]
    return rows, used, released


@pytest.mark.parametrize("world_size", [2, 4])
def test_copy_engine_matches_reference_and_nccl_bytes(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs")
    for rows, used, released in run_distributed(_transports, world_size, timeout=300):
        assert released[0] > 0 and not any(released[1:]), released  # bytes freed, every capacity back to 0
        assert {use for _, use, _, _ in used} == {"send", "grad"}, used
        assert all(usable and capacity > 0 and count > 0 for usable, _, capacity, count in used), used
        for name, layout, errors, sent in rows:
            assert len(set(sent.values())) == 1 and sum(sent["core", "nccl"]) > 0, (name, layout, sent)
            for key, found in errors.items():
                assert max(found.values()) < 1e-10, (name, layout, key, found)
