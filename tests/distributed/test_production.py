"""RingDilatedAttentionProduction on real gloo process groups: each hardening feature tested.

Three spawns: one group of 4 for exactness, checkpointing, buffer reuse, the non-finite
guard and determinism; a group of 3 where one rank stalls; a group of 3 where one rank
dies. In the last two the other ranks must raise a clear error within the timeout plus
a margin instead of hanging.
"""

from __future__ import annotations

import os
import re
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from distributed_helpers import run_distributed
from ring_core.testing import Case, fit_case, free_port, sharded_case_errors
from ring_distributed import BufferPool, CollectiveError, NonFiniteError, RingDilatedAttentionProduction

WORLD = 4
TIMEOUT = 2.0
MARGIN = 6.0
CASES = (
    Case("dense-causal-pad", 24, 4, (24,), (1,), causal=True, padding=True),
    Case("dilated-causal-gqa", 48, 8, (4, 8, 48), (1, 2, 4), kv_heads=4, causal=True),
)
DILATED = {"segment_lengths": [4, 16], "dilation_rates": [1, 2]}
SPANNING = {"segment_lengths": [4, 64], "dilation_rates": [1, 2]}  # the rate-2 branch spans every shard


def _inputs(rank, n=8, heads=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed * 100 + rank)
    return [torch.randn(1, n, heads, 8, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


def _step(module, q, k, v, causal=True):
    out = module(q, k, v, is_causal=causal)
    out.backward(torch.ones_like(out))
    return out.detach().clone(), [x.grad.clone() for x in (q, k, v)]


def _exactness(rank, world_size):
    rows = []
    features = {"checkpoint": True, "deterministic": True, "on_nonfinite": "raise", "timeout": 30.0}
    for strategy in ({"strategy": "ring"}, {"strategy": "hybrid", "ulysses_degree": 2}, {"strategy": "allgather"}):
        for case in CASES:
            for layout in ("contiguous", "zigzag"):
                fitted = fit_case(case, world_size, layout)
                module = RingDilatedAttentionProduction(**fitted.config, layout=layout, **strategy, **features)
                errors = sharded_case_errors(module, fitted, rank, world_size, layout, seed=len(rows))
                rows.append((strategy["strategy"], case.name, layout, errors))
    return rows


def _saved_bytes(module, q, k, v):
    """Bytes the autograd graph keeps for backward, not counting the inputs themselves."""
    inputs = {x.untyped_storage().data_ptr() for x in (q, k, v)}
    total = [0]

    def pack(x):
        if x.untyped_storage().data_ptr() not in inputs:
            total[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = module(q, k, v, is_causal=True)
    out.backward(torch.ones_like(out))
    return total[0]


def _checkpoint(rank):
    result = {}
    for strategy in ("ring", "hybrid"):
        degree = 2 if strategy == "hybrid" else None
        saved, grads = {}, {}
        for checkpoint in (False, True):
            module = RingDilatedAttentionProduction(
                **DILATED, strategy=strategy, ulysses_degree=degree, checkpoint=checkpoint
            )
            q, k, v = _inputs(rank, seed=3)
            saved[checkpoint] = _saved_bytes(module, q, k, v)
            grads[checkpoint] = [x.grad for x in (q, k, v)]
        same = all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
        result[strategy] = (saved[False], saved[True], same)
    return result


def _buffers(rank):
    module = RingDilatedAttentionProduction(**SPANNING)
    counts = []
    for step in range(3):
        _step(module, *_inputs(rank, seed=step))
        counts.append(module.buffer_pool.allocations)
    nbytes = module.buffer_pool.nbytes
    _step(module, *_inputs(rank, n=16, seed=9))  # a new shape: new buffers, once
    counts.append(module.buffer_pool.allocations)
    _step(module, *_inputs(rank, n=16, seed=10))
    counts.append(module.buffer_pool.allocations)
    plain = RingDilatedAttentionProduction(**SPANNING, reuse_buffers=False)
    out_reused = _step(module, *_inputs(rank, seed=4))
    out_plain = _step(plain, *_inputs(rank, seed=4))
    same = torch.equal(out_reused[0], out_plain[0]) and all(
        torch.equal(a, b) for a, b in zip(out_reused[1], out_plain[1])
    )
    return {"counts": counts, "nbytes": nbytes, "plain": plain.buffer_pool.allocations, "same": same}


def _nonfinite(rank):
    result = {}
    # raise: NaN in k on rank 2 at step 2; every rank raises, naming rank, step and tensor
    module = RingDilatedAttentionProduction(**DILATED, on_nonfinite="raise")
    _step(module, *_inputs(rank))
    q, k, v = _inputs(rank, seed=1)
    if rank == 2:
        with torch.no_grad():
            k[0, 3, 1, 0] = float("nan")
    try:
        _step(module, q, k, v)
        result["raise"] = None
    except NonFiniteError as exc:
        result["raise"] = str(exc)
    # gradients: an Inf in dout of rank 1 at step 3
    q, k, v = _inputs(rank, seed=2)
    out = module(q, k, v, is_causal=True)
    dout = torch.ones_like(out)
    if rank == 1:
        dout[0, 0, 0, 0] = float("inf")
    try:
        out.backward(dout)
        result["raise-grad"] = None
    except NonFiniteError as exc:
        result["raise-grad"] = str(exc)
    # skip: the step's output and gradients are zero on every rank, a warning, an event; the next step works
    module = RingDilatedAttentionProduction(**DILATED, on_nonfinite="skip")
    q, k, v = _inputs(rank, seed=1)
    if rank == 2:
        with torch.no_grad():
            v[0, 5, 0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = _step(module, q, k, v)
    result["skip-zero"] = bool(out.abs().max() == 0 and all(g.abs().max() == 0 for g in grads))
    result["skip-warning"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    result["skip-events"] = module.nonfinite_events
    out, grads = _step(module, *_inputs(rank, seed=5))
    result["skip-next-finite"] = bool(torch.isfinite(out).all() and out.abs().max() > 0)
    return result


def _determinism(rank):
    def run(deterministic):
        module = RingDilatedAttentionProduction(**DILATED, dropout=0.3, deterministic=deterministic, seed=11)
        module.train()
        return [_step(module, *_inputs(rank, seed=step)) for step in range(2)]

    def identical(a, b):
        return all(torch.equal(x[0], y[0]) and all(torch.equal(g, h) for g, h in zip(x[1], y[1])) for x, y in zip(a, b))

    torch.manual_seed(rank)
    first = run(True)
    torch.manual_seed(rank + 100)  # another global RNG state must not matter
    second = run(True)
    third, fourth = run(False), run(False)
    steps_differ = not torch.equal(first[0][0], first[1][0])
    return {"deterministic": identical(first, second), "default": identical(third, fourth), "steps": steps_differ}


def _world(rank, world_size):
    result = {
        "exact": _exactness(rank, world_size),
        "checkpoint": _checkpoint(rank),
        "buffers": _buffers(rank),
        "nonfinite": _nonfinite(rank),
        "determinism": _determinism(rank),
    }
    dist.barrier()
    return result


@pytest.fixture(scope="module")
def world():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return run_distributed(_world, WORLD, timeout=600)


@pytest.mark.distributed
def test_every_feature_on_is_still_exact(world):
    """checkpoint + deterministic + guard + timeout, ring / hybrid 2x2 / allgather: reference rows, float64."""
    for rank, result in enumerate(world):
        assert len(result["exact"]) == 3 * len(CASES) * 2
        for strategy, case, layout, errors in result["exact"]:
            assert errors["out"] <= 1e-10 and max(errors.values()) <= 1e-9, (rank, strategy, case, layout, errors)


@pytest.mark.distributed
def test_checkpoint_keeps_less_and_gives_the_same_gradients(world):
    for rank, result in enumerate(world):
        for strategy, (plain, checkpointed, same) in result["checkpoint"].items():
            assert plain > 0, (rank, strategy)
            assert checkpointed < plain / 4, (rank, strategy, plain, checkpointed)
            assert same, (rank, strategy)


@pytest.mark.distributed
def test_communication_buffers_are_allocated_once_per_shape(world):
    for rank, result in enumerate(world):
        counts = result["buffers"]["counts"]
        assert counts[0] > 0 and result["buffers"]["nbytes"] > 0
        assert counts[0] == counts[1] == counts[2], counts  # steps 2 and 3 reuse step 1's buffers
        assert counts[3] > counts[2] and counts[3] == counts[4], counts  # a new shape: once
        assert result["buffers"]["plain"] == 0
        assert result["buffers"]["same"], rank


@pytest.mark.distributed
def test_nonfinite_guard_names_rank_step_and_tensor(world):
    for rank, result in enumerate(world):
        found = result["nonfinite"]
        assert found["raise"] is not None and re.search(
            r"step 2: NaN/Inf in the inputs: k on rank 2 \(1 non-finite elements\)", found["raise"]
        ), (rank, found["raise"])
        assert found["raise-grad"] is not None and re.search(
            r"step 3: NaN/Inf in the gradients: .*on rank 1", found["raise-grad"]
        ), (rank, found["raise-grad"])
        assert found["skip-zero"], rank
        assert any("step 1: NaN/Inf in the inputs: v on rank 2" in w for w in found["skip-warning"]), found
        assert found["skip-events"] == [{"step": 1, "stage": "inputs", "found": [(2, "v", 1)]}]
        assert found["skip-next-finite"], rank


@pytest.mark.distributed
def test_deterministic_runs_are_bitwise_identical(world):
    """With dropout: deterministic runs repeat bit for bit; default runs do not (so the check can fail)."""
    for result in world:
        assert result["determinism"] == {"deterministic": True, "default": False, "steps": True}


# -- a peer stalls or dies: every other rank raises within the timeout plus a margin -----------------


def _stall(rank, world_size):
    module = RingDilatedAttentionProduction(**SPANNING, timeout=TIMEOUT)
    _step(module, *_inputs(rank))  # step 1: everyone (validation done)
    if rank == world_size - 1:
        time.sleep(TIMEOUT + MARGIN + 2)  # stalls through step 2, never joins
        return None
    start = time.monotonic()
    try:
        _step(module, *_inputs(rank, seed=1))
        return ("no error", time.monotonic() - start)
    except CollectiveError as exc:
        return (str(exc), time.monotonic() - start)


def _die(rank, world_size, queue):
    module = RingDilatedAttentionProduction(**SPANNING, timeout=TIMEOUT)
    _step(module, *_inputs(rank))
    if rank == world_size - 1:
        os._exit(3)
    start = time.monotonic()
    try:
        _step(module, *_inputs(rank, seed=1))
        queue.put((rank, "no error", time.monotonic() - start))
    except CollectiveError as exc:
        queue.put((rank, str(exc), time.monotonic() - start))
    return None


def _die_worker(rank, world_size, port, queue):
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    _die(rank, world_size, queue)
    queue.close()
    queue.join_thread()  # flush the result before leaving
    os._exit(0)  # the group is broken: skip the collective teardown


@pytest.mark.distributed
def test_a_stalled_peer_makes_every_other_rank_raise_in_time():
    results = run_distributed(_stall, 3, timeout=120)
    for rank, value in enumerate(results[:2]):
        message, elapsed = value
        assert re.search(
            rf"rank {rank}: RingDilatedAttentionProduction rank {rank}, step 2: agreement of the inputs across ranks "
            rf"\(all-gather\) did not complete within timeout=2 s: a peer stalled or died",
            message,
        ), message
        assert elapsed < TIMEOUT + MARGIN, (rank, elapsed)


@pytest.mark.distributed
def test_a_dead_peer_makes_every_other_rank_raise_in_time():
    import queue as queue_module

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=_die_worker, args=(r, 3, port, queue), daemon=True) for r in range(3)]
    for process in processes:
        process.start()
    results = {}
    try:
        while len(results) < 2:
            rank, message, elapsed = queue.get(timeout=90)
            results[rank] = (message, elapsed)
    except queue_module.Empty:
        pytest.fail(f"only ranks {sorted(results)} reported within 90 s: a rank hangs")
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
    assert processes[2].exitcode == 3
    for rank, (message, elapsed) in results.items():
        assert re.search(
            rf"rank {rank}: RingDilatedAttentionProduction rank {rank}, step 2: .*did not complete", message
        )
        assert elapsed < TIMEOUT + MARGIN, (rank, elapsed)


# -- no processes needed ------------------------------------------------------------------------------


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \[None, 'raise', 'skip'\], got 'ignore'"):
        RingDilatedAttentionProduction([8], [1], on_nonfinite="ignore")
    with pytest.raises(ValueError, match=r"timeout must be a positive number of seconds or None, got -1"):
        RingDilatedAttentionProduction([8], [1], timeout=-1)


def test_buffer_pool_reuses_by_key():
    pool = BufferPool()
    like = torch.empty(0)
    a = pool.get(("forward", "recv", 0), 10, like)
    assert pool.get(("forward", "recv", 0), 10, like) is a
    pool.get(("forward", "recv", 1), 10, like)
    assert pool.allocations == 2 and pool.nbytes == 2 * 10 * 4


def test_buffers_are_nn_modules_and_the_pool_has_its_own_name():
    module = RingDilatedAttentionProduction(**DILATED)
    assert isinstance(module.buffer_pool, BufferPool)
    assert "buffers" not in vars(module)  # nn.Module.buffers() is not shadowed
    probe = torch.arange(3.0)
    module.register_buffer("probe", probe)
    buffers = list(module.buffers())
    assert len(buffers) == 1 and buffers[0] is probe
    assert [name for name, _ in module.named_buffers()] == ["probe"]
    module.to(torch.float64)  # nn.Module's buffer machinery reaches it
    assert module.probe.dtype == torch.float64 and torch.equal(module.state_dict()["probe"], probe.double())


def test_single_process_skip_and_checkpoint():
    q, k, v = _inputs(0)
    with torch.no_grad():
        q[0, 0, 0, 0] = float("nan")
    module = RingDilatedAttentionProduction(**DILATED, on_nonfinite="skip", checkpoint=True)
    with pytest.warns(RuntimeWarning, match=r"step 1: NaN/Inf in the inputs: q on rank 0 \(1 non-finite elements\)"):
        out = module(q, k, v)
    assert out.abs().max() == 0
