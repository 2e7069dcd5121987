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
from ring_blocksparse.rows import gather_rows, scatter_rows
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


def _schedule(plan, q):
    return StripRingSchedule(plan, dense_strip_kernel(q, False, q.shape[-1] ** -0.5, None), sparse="math")


@pytest.mark.parametrize("name", [name for name in CASES if not CASES[name][6]])  # (it passes no padding)
def test_simulated_rank_steps_match_reference(name):
    """The benchmark's one-process run of each rank's steps (``rank_steps``: the schedule's own step methods),
    the received rows' gradients returned to their ranks: the reference's output and gradients."""
    q, k, v, dout, _ = _inputs(name)
    expected, expected_grads = _reference(name)
    out = torch.empty_like(expected)
    grads = [torch.zeros_like(x) for x in (q, k, v)]
    shards = [shard_positions(N, r, WORLD, "contiguous") for r in range(WORLD)]
    local = [[x[:, rows] for x in (q, k, v, dout)] for rows in shards]
    for rank in range(WORLD):
        plan = _plan(name, rank)
        received = {s: tuple(x.index_select(1, plan.recv_rows[s]) for x in local[s][1:3]) for s in plan.recv_rows}
        state: dict = {}
        rank_steps(_schedule(plan, local[rank][0]), plan, rank, local[rank], received, state, backward=True)
        out[:, shards[rank]] = state["out"]
        for grad, key in zip(grads, ("dq", "dk", "dv")):
            grad[:, shards[rank]] += state[key]
        for s, (rows, dk_rows, dv_rows) in state["remote"].items():
            grads[1][:, shards[s][rows]] += dk_rows
            grads[2][:, shards[s][rows]] += dv_rows
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    for grad, ref in zip(grads, expected_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-11)


def _ring_rank(rank: int, world_size: int) -> dict:
    results = {}
    for name, (segments, rates, _, _, (pattern, options), causal, _, _) in CASES.items():
        q, k, v, dout, mask = _inputs(name)
        local = [shard_sequence(x, "contiguous", rank=rank, world_size=world_size).requires_grad_() for x in (q, k, v)]
        attn = BlockSparseRingDilatedAttention(
            segments, rates, block_size=BLOCK, pattern=pattern, method="flex", merge=MERGE.get(name, "lse"), **options
        )
        attn.sparse_kernel = "math"
        local_mask = None if mask is None else shard_sequence(mask, "contiguous", rank=rank, world_size=world_size)
        out = attn(*local, is_causal=causal, key_padding_mask=local_mask)
        out.backward(shard_sequence(dout, "contiguous", rank=rank, world_size=world_size))
        plan = attn.last_plan
        flags = {s: (plan.whole[s], *plan.key_views[s]) for s in plan.recv_rows}
        results[name] = {"out": out.detach().numpy(), "grads": [x.grad.numpy() for x in local], "flags": flags}
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
            rows = shard_positions(N, rank, WORLD, "contiguous")
            torch.testing.assert_close(torch.from_numpy(got["out"]), expected[:, rows], rtol=1e-10, atol=1e-12)
            for grad, ref in zip(got["grads"], expected_grads):
                torch.testing.assert_close(torch.from_numpy(grad), ref[:, rows], rtol=1e-9, atol=1e-11)


def _strided_pair(dtype, device):
    """A received K|V buffer's K view (rows of H x D in rows of H x 2D) and a strided shard-sized target."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    kv = torch.randn(3, 7, 5, 2 * 9, generator=generator).to(dtype=dtype, device=device)
    shard = torch.randn(3, 19, 6, 11, generator=generator).to(dtype=dtype, device=device)[:, :, 1:, 2:]
    rows = torch.tensor([0, 2, 3, 7, 11, 12, 18], device=device)
    return kv[..., :9], shard, rows


def _check_rows(scatter, gather, device):
    for dtype in (torch.float32, torch.bfloat16):
        src, shard, rows = _strided_pair(dtype, device)
        expected = shard.clone().index_copy_(1, rows, src)
        scatter(shard, rows, src)
        assert torch.equal(shard, expected)
        packed = torch.empty_like(src)
        gather(packed, shard, rows)
        assert torch.equal(packed, src)


def test_rows_on_the_cpu():
    _check_rows(scatter_rows, gather_rows, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rows_on_cuda_match_index_copy():
    """The Triton row copies (when Triton is installed) on odd shapes and strided views, vs torch."""
    _check_rows(scatter_rows, gather_rows, "cuda")


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

        _check_rows(scatter, gather, "cpu")
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
