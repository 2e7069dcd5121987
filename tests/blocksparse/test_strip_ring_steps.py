"""The sparse ring's step paths (:mod:`ring_blocksparse.strip_ring`'s Note): a whole received shard read in place
with its gradients written into the send buffer, a partial one scattered and gathered, key gradients written
(disjoint calls) or added (overlapping ones); each exact against the float64 reference, in real gloo rings and
through the benchmark's one-process simulation of a rank's steps."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.distributed_helpers import run_distributed

from ring_blocksparse import BlockSparseRingDilatedAttention, build_pattern
from ring_blocksparse.attention import dense_strip_kernel
from ring_blocksparse.rows import add_rows, gather_rows, scatter_rows
from ring_blocksparse.strip_ring import StripRingSchedule, build_strip_plan, disjoint_and_covering
from ring_core import reference_attention
from ring_core.dilated import branches
from ring_core.sharding import shard_positions, shard_sequence
from tools.bench.blocksparse_strips import rank_steps

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

N, BLOCK, WORLD = 96, 8, 2
# name: segments, rates, heads, kv heads, pattern (name, options), causal, padded,
#       expected per source (every row received, calls' key views disjoint, and covering)
CASES = {
    "whole-written": ((N,), (1,), 4, 4, ("random", {"density": 0.5, "seed": 3}), False, True, (True, True, True)),
    "partial-written": ((N,), (1,), 4, 2, ("local_window", {"window": 16, "sliding": True}), True, False,
                        (False, True, True)),
    "dilated-zeroed": ((32, N), (1, 2), 4, 4, (None, {}), False, False, (True, True, False)),
    "shared-kv-added": ((32, N), (1, 2), 4, 1, ("random", {"density": 0.6, "seed": 1}), False, False,
                        (True, False, False)),
}  # fmt: skip
MERGE = {"dilated-zeroed": "head_groups"}  # its branches on their own heads: disjoint calls, not every head per row


def _inputs(name: str):
    _, _, h, hkv, *_ = CASES[name]
    generator = torch.Generator().manual_seed(len(name))
    q, dout = (torch.randn(2, N, h, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(2, N, hkv, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, 5:9] = mask[1, 60:70] = True
    return q, k, v, dout, mask if CASES[name][6] else None


def _layout(name: str) -> torch.Tensor | None:
    pattern, options = CASES[name][4]
    return None if pattern is None else build_pattern(pattern, **options).layout(N, BLOCK, CASES[name][2])


def _reference(name: str):
    segments, rates, *_, causal, _, _ = CASES[name]
    q, k, v, dout, mask = _inputs(name)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    layout = _layout(name)
    extra = {} if layout is None else {"block_layout": layout, "block_size": BLOCK}
    out = reference_attention(
        *leaves, segment_lengths=segments, dilation_rates=rates, is_causal=causal, key_padding_mask=mask,
        merge=MERGE.get(name, "lse"), **extra,
    )  # fmt: skip
    out.backward(dout)
    return out.detach(), [x.grad for x in leaves]


def _plan(name: str, rank: int):
    segments, rates, h, hkv, _, causal, padded, _ = CASES[name]
    q = torch.empty(2, N // WORLD, h, 4, dtype=torch.float64)
    return build_strip_plan(
        seq_len=N, rank=rank, world_size=WORLD, layout_kind="contiguous", q=q, num_heads=h, num_kv_heads=hkv,
        branch_list=branches(segments, rates, MERGE.get(name, "lse"), h), block_size=BLOCK, layout=_layout(name), causal=causal,
        padded=padded,
    )  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_each_case_takes_its_path(name):
    """The plans' flags: what every source's step does (so the ring tests below cover every path)."""
    for rank in range(WORLD):
        plan = _plan(name, rank)
        for source in plan.recv_rows:
            assert (plan.whole[source], *plan.key_views[source]) == CASES[name][-1]


def test_overlapping_key_views_are_not_disjoint():
    """Calls sharing a key/value head on the same rows: both must add there, so writing would drop one."""
    plan = _plan("shared-kv-added", 0)
    calls, rows = plan.calls[1], plan.recv_rows[1]
    assert len(calls) > 1 and disjoint_and_covering(calls, rows, N // WORLD, 1) == (False, False)
    assert disjoint_and_covering(calls[:1], rows, N // WORLD, 1) == (True, True)  # the rate-1 call alone
    # the same calls as if each had its own key/value head: disjoint again
    assert disjoint_and_covering(calls[1:], rows, N // WORLD, 1)[0]

    # writing instead of adding on these calls changes the key gradients (the flag is what keeps them right)
    q, k, v, dout, _ = _inputs("shared-kv-added")
    local = [shard_sequence(x, "contiguous", rank=0, world_size=WORLD) for x in (q, k, v, dout)]
    remote = [shard_sequence(x, "contiguous", rank=1, world_size=WORLD) for x in (k, v)]
    schedule = _schedule(plan, local[0])
    state: dict = {}
    rank_steps(schedule, plan, 0, local, {1: tuple(remote)}, state, backward=False)
    grads = []
    for write in (False, True):
        dkb, dvb = (torch.zeros_like(x) for x in remote)
        dq = torch.zeros_like(local[0])
        schedule.backward_step(
            local[0], calls, *remote, state["out"], state["lse"], local[3], dq, dkb, dvb, write_keys=write
        )
        grads.append(dkb)
    assert not torch.allclose(grads[0], grads[1])


def _schedule(plan, q, sparse="math"):
    return StripRingSchedule(plan, dense_strip_kernel(q, False, q.shape[-1] ** -0.5, None), sparse=sparse)


def _simulate(inputs, plan_of, sparse: str = "math", world: int = WORLD):
    """The benchmark's one-process run of each rank's steps (``rank_steps``: the schedule's own step methods),
    the received rows' gradients returned to their ranks: the whole output and gradients (float64), and the
    dtype the remote gradients travelled in, per (rank, source)."""
    q, k, v, dout = inputs
    n = q.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    grads = [torch.zeros_like(x, dtype=torch.float64) for x in (q, k, v)]
    shards = [shard_positions(n, r, world, "contiguous").to(q.device) for r in range(world)]
    local = [[x[:, rows] for x in (q, k, v, dout)] for rows in shards]
    travelled = {}
    for rank in range(world):
        plan = plan_of(rank)
        received = {s: tuple(x.index_select(1, plan.recv_rows[s]) for x in local[s][1:3]) for s in plan.recv_rows}
        state: dict = {}
        rank_steps(_schedule(plan, local[rank][0], sparse), plan, rank, local[rank], received, state, backward=True)
        out[:, shards[rank]] = state["out"].double()
        for grad, key in zip(grads, ("dq", "dk", "dv")):
            grad[:, shards[rank]] += state[key]
        for s, (rows, dk_rows, dv_rows) in state["remote"].items():
            grads[1][:, shards[s][rows]] += dk_rows
            grads[2][:, shards[s][rows]] += dv_rows
            travelled[rank, s] = dk_rows.dtype
    return out, grads, travelled


@pytest.mark.parametrize("name", [name for name in CASES if not CASES[name][6]])  # (it passes no padding)
def test_simulated_rank_steps_match_reference(name):
    """Each rank's steps run in one process (the benchmark's simulation): the reference's output and gradients."""
    q, k, v, dout, _ = _inputs(name)
    expected, expected_grads = _reference(name)
    out, grads, _ = _simulate((q, k, v, dout), lambda rank: _plan(name, rank))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for grad, ref in zip(grads, expected_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", [name for name in CASES if not CASES[name][6]])
def test_simulated_rank_steps_on_flex_backward_kernel(name, backward_operator):
    """The steps on FlexAttention (its eager form on the CPU): each step's backward is FlexAttention's backward
    operator on the final out and lse (no forward again; autograd's FlexAttention has no CPU backward at all), and
    the result is the reference's, batched calls, GQA, head selections and causal included."""
    q, k, v, dout, _ = _inputs(name)
    expected, expected_grads = _reference(name)
    out, grads, _ = _simulate((q, k, v, dout), lambda rank: _plan(name, rank), sparse="flex")
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for grad, ref in zip(grads, expected_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-11)


def test_flex_backward_kernel_compiles_whole(monkeypatch, backward_operator):
    """What CUDA runs: the operator call traced by dynamo in one graph (``fullgraph``), its graphs passed as it
    expects them; here through AOTAutograd on the CPU (Inductor lowers it only for GPUs), equal to the reference.
    Every step's shapes compile again, passing the same graphs (which dynamo marked static when it installed them)."""
    from ring_blocksparse import flex_backward

    torch._dynamo.reset()
    traced = torch.compile(flex_backward._operator_call, fullgraph=True, dynamic=False, backend="aot_eager")
    monkeypatch.setattr(flex_backward, "_backward", lambda device, tile: traced)
    name = "partial-written"
    q, k, v, dout, _ = _inputs(name)
    _, expected_grads = _reference(name)
    for batch in (slice(None), slice(0, 1)):  # (the second: other shapes, a new compile of the same graphs)
        _, grads, _ = _simulate(tuple(x[batch] for x in (q, k, v, dout)), lambda rank: _plan(name, rank), sparse="flex")
        for grad, ref in zip(grads, expected_grads):
            torch.testing.assert_close(grad, ref[batch], rtol=1e-9, atol=1e-11)


def test_flex_backward_kernel_carries_head_selections_back(backward_operator):
    """Three head groups of 4 query heads over 4 key/value heads (groups of 3): a branch's heads read key/value
    heads unevenly, so its calls select them by index; the backward operator's key gradients go back through
    that selection (summed where a head is read twice)."""
    segments, rates = (24, 48, N), (1, 2, 4)
    generator = torch.Generator().manual_seed(12)
    q, dout = (torch.randn(1, N, 12, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, N, 4, 4, generator=generator, dtype=torch.float64) for _ in range(2))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    reference_attention(*leaves, segment_lengths=segments, dilation_rates=rates, merge="head_groups").backward(dout)

    def plan_of(rank):
        return build_strip_plan(
            seq_len=N, rank=rank, world_size=WORLD, layout_kind="contiguous", q=q[:, : N // WORLD], num_heads=12,
            num_kv_heads=4, branch_list=branches(segments, rates, "head_groups", 12), block_size=BLOCK, layout=None,
            causal=False, padded=False,
        )  # fmt: skip

    assert any(not isinstance(c.kv, slice) for calls in plan_of(0).calls.values() for c in calls)
    _, grads, _ = _simulate((q, k, v, dout), plan_of, sparse="flex")
    for grad, leaf in zip(grads, leaves):
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-9, atol=1e-11)


def _ring_rank(rank: int, world_size: int) -> dict:
    from ring_blocksparse import strip_ring

    built = []  # the per-call cuts (padding) each call_cuts made: the forward's steps', reused by the backward's
    call_cuts = strip_ring.call_cuts
    strip_ring.call_cuts = lambda units, pad, documents: (
        built.append(pad is not None)
        or call_cuts(  # type: ignore[func-returns-value]
            units, pad, documents
        )
    )
    results = {}
    for name, (segments, rates, _, _, (pattern, options), causal, _, _) in CASES.items():
        q, k, v, dout, mask = _inputs(name)
        local = [shard_sequence(x, "contiguous", rank=rank, world_size=world_size).requires_grad_() for x in (q, k, v)]
        attn = BlockSparseRingDilatedAttention(
            segments, rates, block_size=BLOCK, pattern=pattern, method="flex", merge=MERGE.get(name, "lse"), **options
        )
        attn.sparse_kernel = "math"
        local_mask = None if mask is None else shard_sequence(mask, "contiguous", rank=rank, world_size=world_size)
        built.clear()
        out = attn(*local, is_causal=causal, key_padding_mask=local_mask)
        forward_cuts = list(built)
        out.backward(shard_sequence(dout, "contiguous", rank=rank, world_size=world_size))
        plan = attn.last_plan
        flags = {s: (plan.whole[s], *plan.key_views[s]) for s in plan.recv_rows}
        results[name] = {
            "out": out.detach().numpy(), "grads": [x.grad.numpy() for x in local], "flags": flags,
            "cuts": (forward_cuts, built[len(forward_cuts):]),
        }  # fmt: skip
    return results


@pytest.mark.distributed
def test_ring_steps_match_reference():
    """Real gloo ranks, every path of the steps (whole, partial; written, zeroed then written, added; padded)."""
    by_rank = run_distributed(_ring_rank, WORLD, timeout=300)
    for name in CASES:
        expected, expected_grads = _reference(name)
        for rank, result in enumerate(by_rank):
            got = result[name]
            assert set(got["flags"].values()) == {CASES[name][-1]}
            # each step's cuts (padded cases: built) made once, in the forward
            forward_cuts, backward_cuts = got["cuts"]
            assert forward_cuts and set(forward_cuts) == {CASES[name][6]} and backward_cuts == []
            rows = shard_positions(N, rank, WORLD, "contiguous")
            torch.testing.assert_close(torch.from_numpy(got["out"]), expected[:, rows], rtol=1e-10, atol=1e-12)
            for grad, ref in zip(got["grads"], expected_grads):
                torch.testing.assert_close(torch.from_numpy(grad), ref[:, rows], rtol=1e-9, atol=1e-11)


# at 4 ranks: every pair's key views disjoint (bf16 returns); and disjoint for some pairs, overlapping (float32) for others
BF16_CASES = {"partial-written": {True}, "shared-kv-added": {True, False}}


def _bf16_ring_rank(rank: int, world_size: int) -> dict:
    results = {}
    for name in BF16_CASES:
        segments, rates, _, _, (pattern, options), causal, _, _ = CASES[name]
        q, k, v, dout, _ = _inputs(name)
        local = [shard_sequence(x, "contiguous", rank=rank, world_size=world_size) for x in (q, k, v, dout)]
        leaves = [x.bfloat16().requires_grad_() for x in local[:3]]
        attn = BlockSparseRingDilatedAttention(
            segments, rates, block_size=BLOCK, pattern=pattern, method="flex", **options
        )
        attn.sparse_kernel = "math"
        out = attn(*leaves, is_causal=causal)
        out.backward(local[3].bfloat16())
        plan, row = attn.last_plan, k.shape[0] * k.shape[2] * 2 * k.shape[3]  # elements of one K|V row
        # the backward sends K|V rows again (bf16), then returns each source's key|value gradients: 2 bytes an
        # element where this rank's calls' views of that source are disjoint, else 4 (float32 sums)
        kv_bytes = sum(rows.numel() * row * 2 for rows in plan.send_rows.values())
        grad_bytes = sum(plan.recv_rows[s].numel() * row * (2 if plan.key_views[s][0] else 4) for s in plan.recv_rows)
        results[name] = {
            "out": out.detach().double().numpy(),
            "grads": [x.grad.double().numpy() for x in leaves],
            "sent": attn.comm_stats.sent["backward"],
            "expected_sent": kv_bytes + grad_bytes,
            "disjoint": {s: plan.key_views[s][0] for s in plan.recv_rows},
        }
    return results


@pytest.mark.distributed
def test_bf16_ring_returns_disjoint_gradients_in_bf16():
    """Real gloo ranks, bf16: the gradients of another rank's rows travel in bf16 where the calls' key views are
    disjoint (each element one kernel output: nothing lost), in float32 where calls add up, pair by pair (the
    receiver knows which); within SPEC's bf16 bounds of the float64 reference."""
    from ring_core.testing import TOLERANCES, relative_error

    world = 4
    by_rank = run_distributed(_bf16_ring_rank, world, timeout=300)
    out_bound, grad_bound = TOLERANCES[torch.bfloat16]
    for name, disjoint in BF16_CASES.items():
        expected, expected_grads = _reference(name)
        assert {flag for result in by_rank for flag in result[name]["disjoint"].values()} == disjoint
        for rank, result in enumerate(by_rank):
            got = result[name]
            assert got["sent"] == got["expected_sent"]
            rows = shard_positions(N, rank, world, "contiguous")
            assert relative_error(torch.from_numpy(got["out"]), expected[:, rows]) <= out_bound
            for grad, ref in zip(got["grads"], expected_grads):
                assert relative_error(torch.from_numpy(grad), ref[:, rows]) <= grad_bound


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("segments, rates, kv_heads", [((4096,), (1,), 2), ((2048, 4096), (1, 2), 4)], ids=str)
def test_simulated_rank_steps_on_gpu(segments, rates, kv_heads, backward_path):
    """The ring's steps on the GPU's sparse kernels (flash-attn 4 where installed: the key/value gradients of
    disjoint calls written into the bf16 send buffer by the kernel itself), bf16 vs float64 within SPEC's
    bounds; the gradients of another rank's rows travel in bf16 exactly where the calls' key views are
    disjoint."""
    from ring_core.testing import TOLERANCES, relative_error

    n, h, d, block, world = 4096, 4, 128, 128, 2
    layout = build_pattern("random", density=0.3, seed=2, per_head=True).layout(n, block, h)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, dout = (torch.randn(1, n, h, d, device="cuda", generator=gen) for _ in range(2))
    k, v = (torch.randn(1, n, kv_heads, d, device="cuda", generator=gen) for _ in range(2))
    plans = {}

    def plan_of(rank):
        plans[rank] = build_strip_plan(
            seq_len=n, rank=rank, world_size=world, layout_kind="contiguous", q=q[:, : n // world].bfloat16(),
            num_heads=h, num_kv_heads=kv_heads, branch_list=branches(segments, rates, "lse", h), block_size=block,
            layout=layout, causal=False,
        )  # fmt: skip
        return plans[rank]

    out, grads, travelled = _simulate([x.bfloat16() for x in (q, k, v, dout)], plan_of, sparse="auto", world=world)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(
        *leaves, segment_lengths=segments, dilation_rates=rates, block_layout=layout, block_size=block
    )
    expected_grads = torch.autograd.grad(expected, leaves, dout.double())
    out_bound, grad_bound = TOLERANCES[torch.bfloat16]
    assert relative_error(out, expected) <= out_bound
    errors = [relative_error(g, want) for g, want in zip(grads, expected_grads)]
    assert max(errors) <= grad_bound, errors
    assert travelled == {
        (rank, s): torch.bfloat16 if plans[rank].key_views[s][0] else torch.float32
        for rank in plans
        for s in plans[rank].recv_rows
    }
    assert torch.bfloat16 in travelled.values()


def _strided_pair(dtype, device):
    """A received K|V buffer's K view (rows of H x D in rows of H x 2D) and a strided shard-sized target."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    kv = torch.randn(3, 7, 5, 2 * 9, generator=generator).to(dtype=dtype, device=device)
    shard = torch.randn(3, 19, 6, 11, generator=generator).to(dtype=dtype, device=device)[:, :, 1:, 2:]
    rows = torch.tensor([0, 2, 3, 7, 11, 12, 18], device=device)
    return kv[..., :9], shard, rows


def _check_rows(scatter, gather, device, add=None):
    for dtype in (torch.float32, torch.bfloat16):
        src, shard, rows = _strided_pair(dtype, device)
        expected = shard.clone().index_copy_(1, rows, src)
        scatter(shard, rows, src)
        assert torch.equal(shard, expected)
        packed = torch.empty_like(src)
        gather(packed, shard, rows)
        assert torch.equal(packed, src)
        if add is not None:  # into a float32 strided target, repeated rows adding up
            target = _strided_pair(torch.float32, device)[1]
            repeated = torch.tensor([3, 0, 3, 18, 7, 3, 0], device=device)
            expected = target.clone().index_add_(1, repeated, src.float())
            add(target, repeated, src)
            torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)
            assert not torch.equal(target, _strided_pair(torch.float32, device)[1])


def test_rows_on_the_cpu():
    _check_rows(scatter_rows, gather_rows, "cpu", add_rows)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rows_on_cuda_match_index_copy():
    """The Triton row copies and adds (when Triton is installed) on odd shapes and strided views, vs torch."""
    _check_rows(scatter_rows, gather_rows, "cuda", add_rows)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_row_kernel_in_the_interpreter():
    """The Triton kernel itself on the CPU under ``TRITON_INTERPRET=1`` (set before Triton is imported)."""
    script = textwrap.dedent(
        """
        from functools import partial
        from ring_blocksparse.rows import copy_rows_triton
        from tests.blocksparse.test_strip_ring_steps import _check_rows

        def scatter(dst, rows, src):
            copy_rows_triton(dst, src, rows, scatter=True)

        def gather(dst, src, rows):
            copy_rows_triton(dst, src, rows, scatter=False)

        def add(dst, rows, src):
            copy_rows_triton(dst, src, rows, scatter=True, add=True)

        _check_rows(scatter, gather, "cpu", add)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
