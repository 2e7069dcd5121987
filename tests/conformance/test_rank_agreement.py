"""Every sequence-parallel implementation, on real gloo ranks: ranks that disagree all raise, a stalled peer times out.

Ranks that have all seen two input signatures may still call with different ones (rank 0
with the first, the others with the second). Equal byte sizes used to give a wrong result
without any error, different ones aborted the process, and ``is_causal`` differing hung at
P = 3: every rank must raise the same ``RingConfigError`` instead, and the group must still
work afterwards. One process group of 3 runs everything (P = 3 on the world, P = 2 on a
pair), then each ring's ``timeout`` on pairs of it.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import ring_core
from distributed_helpers import raised, run_distributed

pytestmark = pytest.mark.distributed

DISTRIBUTED = [i.name for i in ring_core.list_implementations("attention") if i.distributed and i.available]
MULTIHEAD = "ring_multihead_dilated"
D = 4
# name -> (first, second): (batch, local length, heads, causal) each; equal byte sizes where shapes differ
SCENARIOS = {
    "batch_vs_length": ((2, 8, 4, False), (1, 16, 4, False)),
    "heads_vs_length": ((1, 8, 4, False), (1, 16, 2, False)),
    "causal": ((1, 8, 4, True), (1, 8, 4, False)),
}
WORDS = {"batch_vs_length": ("batch", "local_len"), "heads_vs_length": ("heads",), "causal": ("causal",)}


def _attention(name: str, group, **extra):
    impl = {i.name: i for i in ring_core.list_implementations()}[name]
    if impl.kind == "multihead":
        torch.manual_seed(0)  # the same projections on every rank
        return ring_core.create_multihead_attention(
            name, embed_dim=4 * D, num_heads=4, segment_lengths=[64], dilation_rates=[1], batch_first=True,
            dtype=torch.float64, process_group=group, **extra,
        )  # fmt: skip
    return ring_core.create_attention(
        name, segment_lengths=[64], dilation_rates=[1], process_group=group, **impl.options, **extra
    )


def _call(module, signature, seed: int = 0) -> torch.Tensor:
    batch, length, heads, causal = signature
    generator = torch.Generator().manual_seed(seed)
    if isinstance(module, torch.nn.MultiheadAttention) or hasattr(module, "embed_dim"):
        x = torch.randn(batch, length, 4 * D, generator=generator, dtype=torch.float64)
        return module(x, x, x, need_weights=False, is_causal=causal)[0]
    q, k, v = (torch.randn(batch, length, heads, D, generator=generator, dtype=torch.float64) for _ in range(3))
    return module(q, k, v, is_causal=causal)


def _disagree(rank, group, names):
    found = {}
    for name in names:
        for scenario, (first, second) in SCENARIOS.items():
            if name == MULTIHEAD and scenario == "heads_vs_length":
                continue  # the drop-in's heads are its own, not the inputs'
            module = _attention(name, group)
            for signature in (first, second):  # every rank has seen both signatures
                _call(module, signature)
            found[name, scenario] = raised(lambda m=module, s=first if rank == 0 else second: _call(m, s))
            found[name, scenario, "after"] = bool(torch.isfinite(_call(module, first, seed=1)).all())
        seeds = {"pattern": "random", "density": 0.5, "seed": 1 if rank == 0 else 2}
        if name == "block_sparse_ring_dilated":  # the same pattern name and density, another random layout
            module = _attention(name, group, **seeds)
            found[name, "seed"] = raised(lambda m=module: _call(m, (1, 8, 4, False)))
    return found


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("name", [*DISTRIBUTED, MULTIHEAD])
def test_ranks_that_disagree_on_seen_signatures_all_raise(world, world_size, name):
    per_rank = [result[world_size] for result in world[:world_size]]
    scenarios = [s for s in SCENARIOS if not (name == MULTIHEAD and s == "heads_vs_length")]
    for scenario in scenarios:
        for rank, found in enumerate(per_rank):
            outcome = found[name, scenario]
            assert outcome is not None, f"{name} P={world_size} {scenario}: rank {rank} computed without an error"
            kind, message = outcome
            assert kind == "RingConfigError", (name, world_size, scenario, rank, message)
            words = ("batch", "local length") if name == MULTIHEAD and scenario != "causal" else WORDS[scenario]
            assert all(word in message for word in words), (name, world_size, scenario, rank, message)
            assert found[name, scenario, "after"], f"{name} P={world_size}: a good call failed after {scenario}"


def test_auto_under_data_parallelism_keeps_each_ranks_samples(world):
    """A DDP group exists but no process_group was given: "auto" must not attend across the ranks' samples."""
    for rank, result in enumerate(world):
        for kind, (cls, error) in result["data_parallel"].items():
            assert error == 0, f"rank {rank}: {kind} 'auto' picked {cls}, off by {error} from its own samples"


def test_a_rank_outside_the_group_and_unequal_shards_are_clear_errors(world):
    kind, message = world[2]["misuse"]["outside"]
    assert kind == "ValueError" and "global rank 2) is not a member of process_group (global ranks [0, 1])" in message
    for result in world:
        kind, message = result["misuse"]["unshard"]
        assert kind == "RingConfigError", message
        assert "same shape and dtype, got rank 0: (1, 4, 2), rank 1: (1, 5, 2), rank 2: (1, 4, 2)" in message
        assert result["misuse"]["unshard_after"] == (1, 12, 2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_block_sparse_ranks_with_different_random_layouts_all_raise(world, world_size):
    for rank, result in enumerate(world[:world_size]):
        kind, message = result[world_size]["block_sparse_ring_dilated", "seed"]
        assert kind == "RingConfigError" and "config" in message, (rank, message)


# -- a peer that stalls in the middle of a call ----------------------------------------------------------

TIMEOUT = 2.0  # the other ranks' work must fit in it on a busy machine; nobody sleeps through it


class _Stalled(Exception):
    """Ends the stalled rank's call without sending anything."""


def _stall(rank, groups, names):
    """Per implementation, on a fresh pair: rank 1 agrees on the inputs, then stalls before its first exchange
    until rank 0 has given up (one barrier on the world per implementation, on every rank)."""
    found = {}
    for name, group in zip(names, groups):
        if rank > 1:
            dist.barrier()
            continue
        module = _attention(name, group, timeout=TIMEOUT)
        exchange, waited = ring_core.comm.RingComm.exchange, []
        if rank == 1:

            def stalled(*args, waited=waited, **kwargs):
                dist.barrier()  # rank 0 is past its timeout
                waited.append(True)
                raise _Stalled

            ring_core.comm.RingComm.exchange = stalled
        start = time.monotonic()
        try:
            found[name] = (raised(lambda m=module: _call(m, (1, 8, 4, False))), time.monotonic() - start)
        finally:
            ring_core.comm.RingComm.exchange = exchange
        if not waited:
            dist.barrier()
    return found


def _data_parallel(rank):
    """``"auto"`` under a plain DDP group: each rank's own samples, never sharded over the ranks."""
    config = {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}
    q, k, v = (torch.randn(2, 16, 4, D, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
               for _ in range(3))  # fmt: skip
    found = {}
    for name, build in (("attention", ring_core.create_attention), ("multihead", ring_core.create_multihead_attention)):
        if name == "multihead":
            torch.manual_seed(0)
            module = build("auto", embed_dim=4 * D, num_heads=4, batch_first=True, dtype=torch.float64, **config)
            torch.manual_seed(0)
            local = ring_core.create_multihead_attention(
                "multihead_dilated", embed_dim=4 * D, num_heads=4, batch_first=True, dtype=torch.float64, **config
            )
            x = q.flatten(2)
            out, expected = module(x, x, x, need_weights=False)[0], local(x, x, x, need_weights=False)[0]
        else:
            module = build("auto", **config)
            out, expected = module(q, k, v), ring_core.DilatedAttention(**config)(q, k, v)
        found[name] = (type(module).__name__, float((out - expected).abs().max()))
    return found


def _stall_in_backward(rank, group):
    """Production with deterministic=True: rank 1 skips the backward; rank 0's ends in a CollectiveError, after
    which deterministic algorithms must be off again (as before the call)."""
    if rank > 1:
        dist.barrier()
        return None
    module = _attention("ring_dilated_production", group, timeout=TIMEOUT, deterministic=True)
    q, k, v = (torch.randn(1, 8, 4, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = module(q, k, v)
    found = None
    if rank == 0:
        found = (raised(lambda: out.sum().backward()), torch.are_deterministic_algorithms_enabled())
    dist.barrier()  # rank 1 never runs its backward
    return found


def _misuse(rank, pair):
    """A rank outside the module's group calls it; the ranks pass shards of different lengths to unshard_sequence."""
    q = torch.randn(1, 4, 2, D, dtype=torch.float64)
    found = {}
    if rank == 2:
        found["outside"] = raised(lambda: ring_core.RingDilatedAttention([8], [1], process_group=pair)(q, q, q))
    found["unshard"] = raised(lambda: ring_core.unshard_sequence(torch.zeros(1, 4 + (rank == 1), 2)))
    found["unshard_after"] = tuple(ring_core.unshard_sequence(torch.zeros(1, 4, 2)).shape)
    return found


def _world(rank, world_size):
    names = [*DISTRIBUTED, MULTIHEAD]
    pair = dist.new_group([0, 1])
    stall_pairs = [dist.new_group([0, 1]) for _ in [*names, "backward"]]  # a stalled exchange spoils its group
    results = {"data_parallel": _data_parallel(rank), "misuse": _misuse(rank, pair)}
    results[3] = _disagree(rank, None, names)
    if rank < 2:
        results[2] = _disagree(rank, pair, names)
    dist.barrier()
    results["stall"] = _stall(rank, stall_pairs, names)
    results["stall_in_backward"] = _stall_in_backward(rank, stall_pairs[-1])
    return results


@pytest.fixture(scope="module")
def world():
    return run_distributed(_world, 3, timeout=300)


@pytest.fixture(scope="module")
def stalled(world):
    return [result["stall"] for result in world[:2]]


@pytest.mark.parametrize("name", [*DISTRIBUTED, MULTIHEAD])
def test_a_ring_with_a_timeout_names_rank_step_and_peer_of_a_stalled_exchange(stalled, name):
    (kind, message), elapsed = stalled[0][name]
    assert kind == "CollectiveError", message
    assert "rank 0:" in message and "did not complete within timeout=2 s" in message, message
    assert "exchange 1: receive from group rank 1 = global rank 1" in message, message
    assert "rank 0, step 1:" in message, message
    assert elapsed < TIMEOUT + 3, elapsed
    assert stalled[1][name][0][0] == "_Stalled"


def test_deterministic_mode_is_restored_after_a_collective_error_in_backward(world):
    (kind, message), still_on = world[0]["stall_in_backward"]
    assert kind == "CollectiveError" and "ring exchange (backward" in message, message
    assert not still_on, "torch.use_deterministic_algorithms stayed on after the failed backward"
