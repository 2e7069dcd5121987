"""RingDilatedAttention in real gloo process groups: exactness, bytes on the wire, errors on every rank.

Spawning costs seconds, so one group of 4 processes runs everything (P = 4 on the
world, P = 3 and P = 2 on subgroups, P = 1 on groups of one) and the tests below
assert on its results.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import ring_core
from distributed_helpers import raised, run_distributed
from ring_core import RingDilatedAttention, shard_sequence, unshard_sequence
from ring_core.dilated import branches
from ring_core.ring_plan import _part_rows as part_rows
from ring_core.ring_plan import build_ring_plan
from ring_core.testing import CASES, QUICK_CASES, TOLERANCES, fit_case, sharded_case_errors

LAYOUTS = ("contiguous", "zigzag")
WORLD = 4
B, H, D = 1, 4, 8  # shapes of the byte-count cases
ELEMENT = 8  # float64


def _inputs(n_local: int, seed: int, dtype=torch.float64, heads: int = H, kv_heads: int = H, rank: int = 0):
    generator = torch.Generator().manual_seed(seed * 100 + rank)
    q = torch.randn(B, n_local, heads, D, generator=generator, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(B, n_local, kv_heads, D, generator=generator, dtype=torch.float64).to(dtype) for _ in range(2))
    return q, k, v


def _checks(results, group, world_size, rank, cases, tag):
    for case in cases:
        for layout in LAYOUTS:
            fitted = fit_case(case, world_size, layout)
            module = RingDilatedAttention(**fitted.config, layout=layout, process_group=group)
            errors = sharded_case_errors(module, fitted, rank, world_size, layout, seed=len(results))
            results.append((tag, world_size, case.name, layout, fitted.seq_len, errors))


def _byte_counts(rank):
    """Forward/backward bytes and peers of a few configurations on the P = 4 world (N = 32)."""
    configs = {
        "dense": ([32], [1], "contiguous", False),
        "dense-causal": ([32], [1], "contiguous", True),
        "dense-causal-zigzag": ([32], [1], "zigzag", True),
        "dilated-local": ([4, 8], [1, 2], "contiguous", False),
        "dilated-spanning": ([4, 16], [1, 2], "contiguous", False),
    }
    counts = {}
    for name, (segments, rates, layout, causal) in configs.items():
        module = RingDilatedAttention(segments, rates, layout=layout)
        q, k, v = (x.requires_grad_() for x in _inputs(8, 1, rank=rank))
        module(q, k, v, is_causal=causal).sum().backward()
        stats = module.comm_stats
        counts[name] = (stats.forward_bytes, stats.backward_bytes, dict(stats.peer_bytes))
    return counts


def _errors(rank):
    """Bad inputs on some ranks: every rank raises, nobody hangs, and a good call still works after."""
    out = {}
    dense = {"segment_lengths": [64], "dilation_rates": [1]}

    def call(n_local=4, dtype=torch.float64, layout="contiguous", causal=False, config=dense, q=None, lse=False):
        module = RingDilatedAttention(**config, layout=layout)
        tensors = list(_inputs(n_local, 2, dtype, rank=rank))
        if q is not None:
            tensors[0] = q
        return module(*tensors, is_causal=causal, return_lse=lse)

    out["local_len"] = raised(lambda: call(n_local=5 if rank == 0 else 4))
    out["zigzag_odd"] = raised(lambda: call(n_local=3, layout="zigzag"))
    out["dtype"] = raised(lambda: call(dtype=torch.float32 if rank == 1 else torch.float64))
    other = {"segment_lengths": [8, 64], "dilation_rates": [1, 2]}
    out["config"] = raised(lambda: call(config=other if rank == 2 else dense))
    out["causal"] = raised(lambda: call(causal=rank == 3))
    out["return_lse"] = raised(lambda: call(lse=rank == 1))  # its gradient is one more ring pass: never a hang
    out["bad_tensor"] = raised(lambda: call(q=torch.randn(4, H, D, dtype=torch.float64) if rank == 0 else None))
    out["shard_n"] = raised(lambda: shard_sequence(torch.zeros(1, 10, 2, 2)))
    copy_engine = RingDilatedAttention([64], [1], transport="copy_engine")
    out["copy_engine_cpu"] = raised(lambda: copy_engine(*_inputs(4, 2, rank=rank)))
    out["released"] = ring_core.comm.release_copy_engine_slots()  # none were allocated: nothing to free
    out["after"] = bool(torch.isfinite(call()).all())

    # validation is one small all_gather per call (ranks that saw both shapes may still call with different ones)
    gathers = []
    original = dist.all_gather

    def counting(*args, **kwargs):
        gathers.append(1)
        return original(*args, **kwargs)

    dist.all_gather = counting
    try:
        module = RingDilatedAttention([64], [1])
        for n_local in (4, 4, 4, 6, 6):
            module(*_inputs(n_local, 3, rank=rank))
    finally:
        dist.all_gather = original
    out["gathers"] = len(gathers)
    return out


def _sharding(rank, world_size):
    """shard -> unshard is the identity; unshard's backward sums every rank's gradient."""
    out = {}
    x = torch.arange(2 * 16 * 3, dtype=torch.float64).reshape(2, 16, 3)
    weight = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
    for layout in LAYOUTS:
        local = shard_sequence(x, layout).clone().requires_grad_()
        full = unshard_sequence(local, layout)
        (full * weight).sum().backward()
        out[layout] = (
            torch.equal(full, x),
            torch.allclose(local.grad, world_size * shard_sequence(weight, layout), rtol=0, atol=1e-12),
        )
    return out


def _dropout(rank):
    """With dropout, ``out`` is linear in ``v``: sum <out, dout> = sum <v, dv> over the ranks exactly when backward
    regenerates forward's mask for every block (local ones, computed in a different order, and remote ones)."""
    found = {}
    for name, segments, rates, layout, causal in (
        ("dense-causal-zigzag", [32], [1], "zigzag", True),
        ("dilated-spanning", [4, 16], [1, 2], "contiguous", False),
    ):
        module = RingDilatedAttention(segments, rates, layout=layout, dropout=0.3).train()
        q, k, v = (x.requires_grad_() for x in _inputs(8, 4, rank=rank))
        dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        out = module(q, k, v, is_causal=causal)
        out.backward(dout)
        sums = torch.stack([(out * dout).sum(), (v * v.grad).sum()]).detach()
        dist.all_reduce(sums)
        dropped = not torch.allclose(out, module.eval()(q, k, v, is_causal=causal))
        found[name] = (sums.tolist(), dropped)
    return found


def _world(rank, world_size):
    """Everything, in one process group of 4."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    three = dist.new_group([0, 1, 2])
    singles = [dist.new_group([r]) for r in range(world_size)]
    checks = []
    _checks(checks, None, world_size, rank, CASES, "world")
    _checks(checks, pairs[rank // 2], 2, rank % 2, CASES, f"pair{rank // 2}")
    if rank < 3:
        _checks(checks, three, 3, rank, CASES, "three")
    _checks(checks, singles[rank], 1, 0, CASES[:4], f"single{rank}")
    dist.barrier()
    return {
        "checks": checks,
        "bytes": _byte_counts(rank),
        "errors": _errors(rank),
        "sharding": _sharding(rank, world_size),
        "dropout": _dropout(rank),
    }


@pytest.fixture(scope="module")
def world():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return run_distributed(_world, WORLD, timeout=600)


@pytest.mark.distributed
def test_dropout_backward_regenerates_the_forward_masks(world):
    for result in world:
        for name, ((out_dout, v_dv), dropped) in result["dropout"].items():
            assert dropped, name
            assert out_dout == pytest.approx(v_dv, rel=1e-10, abs=1e-10), name


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_every_rank_matches_reference_rows(world, world_size):
    """float64, every conformance case (dense, dilated with segments below and above a shard, causal,
    GQA, key padding, both merges), contiguous and zigzag: out and dq, dk, dv of every rank."""
    limit_out, limit_grad = TOLERANCES[torch.float64]
    rows = [row for rank_result in world for row in rank_result["checks"] if row[1] == world_size]
    expected = {1: WORLD * 4 * 2, 2: WORLD * len(CASES) * 2, 3: 3 * len(CASES) * 2, 4: WORLD * len(CASES) * 2}
    assert len(rows) == expected[world_size]
    for tag, _, name, layout, seq_len, errors in rows:
        assert errors["out"] <= limit_out, (tag, name, layout, seq_len, errors)
        assert max(errors[g] for g in ("dq", "dk", "dv")) <= limit_grad, (tag, name, layout, seq_len, errors)


def _kv_bytes(rows: int) -> int:
    return rows * B * H * 2 * D * ELEMENT  # k and v rows, all kv heads


@pytest.mark.distributed
def test_bytes_dense_is_the_ring(world):
    """Non-causal dense: every rank sends its whole shard (L = 8 rows) to each of the P - 1 others;
    backward fetches K/V again and returns as many dK/dV bytes (float64)."""
    for rank, result in enumerate(world):
        forward, backward, peers = result["bytes"]["dense"]
        assert forward == (WORLD - 1) * _kv_bytes(8)
        assert backward == 2 * forward
        assert peers == {p: 3 * _kv_bytes(8) for p in range(WORLD) if p != rank}


@pytest.mark.distributed
def test_bytes_dense_causal_skips_future_blocks(world):
    """Causal contiguous: rank s sends only to later ranks. Causal zigzag (chunks of C = 4): rank s sends
    its first chunk to later ranks and both chunks to earlier ones: C * (P - 1 + s) rows (each run once,
    though two query chunks of the receiver use it)."""
    for rank, result in enumerate(world):
        forward, _, _ = result["bytes"]["dense-causal"]
        assert forward == (WORLD - 1 - rank) * _kv_bytes(8)
        forward, backward, _ = result["bytes"]["dense-causal-zigzag"]
        assert forward == 4 * (WORLD - 1 + rank) * _kv_bytes(1)
        # backward: K/V again, plus the dK/dV of every key run it received: C * (2P - 2 - s) rows
        assert backward == forward + 4 * (2 * (WORLD - 1) - rank) * _kv_bytes(1)


@pytest.mark.distributed
def test_bytes_segments_inside_shards_send_nothing(world):
    for result in world:
        assert result["bytes"]["dilated-local"] == (0, 0, {})


@pytest.mark.distributed
def test_bytes_dilated_spanning_sends_only_selected_rows_to_segment_partners(world):
    """Segments [4, 16], rates [1, 2], shards of 8: the 4-branch is local; the 16-branch pairs ranks
    (0,1) and (2,3), and each sends its partner, per offset o, the L/2 rows t = o mod 2 for the H/2 heads of
    that offset: L * H / 2 rows of one head in all, 1/2 of the dense bytes."""
    for rank, result in enumerate(world):
        forward, backward, peers = result["bytes"]["dilated-spanning"]
        assert forward == _kv_bytes(8) // 2
        assert backward == 2 * forward
        assert set(peers) == {rank ^ 1}


@pytest.mark.distributed
def test_errors_are_raised_on_every_rank(world):
    errors = [result["errors"] for result in world]
    for scenario, words in {
        "local_len": ("local_len", "divisible by the world size"),
        "zigzag_odd": ("zigzag", "2*P"),
        "dtype": ("dtype",),
        "config": ("config",),
        "causal": ("causal",),
        "return_lse": ("config",),
    }.items():
        for rank, result in enumerate(errors):
            assert result[scenario] is not None, f"rank {rank} did not raise for {scenario}"
            kind, message = result[scenario]
            assert kind == "RingConfigError", (scenario, rank, message)
            assert all(word in message for word in words), (scenario, rank, message)
    assert errors[0]["bad_tensor"][0] == "ValueError" and "4 dims" in errors[0]["bad_tensor"][1]
    for rank in range(1, WORLD):
        assert errors[rank]["bad_tensor"][0] == "RingConfigError" and "rank(s) [0]" in errors[rank]["bad_tensor"][1]
    for result in errors:
        assert result["shard_n"][0] == "ValueError" and "N=10" in result["shard_n"][1]
        assert result["copy_engine_cpu"] == ("ValueError", "transport='copy_engine' needs CUDA tensors, got device cpu")
        assert result["released"] == 0
        assert result["after"] is True
        assert result["gathers"] == 5  # one per call


@pytest.mark.distributed
def test_unshard_inverts_shard_and_sums_gradients(world):
    for result in world:
        assert result["sharding"] == {layout: (True, True) for layout in LAYOUTS}


@pytest.mark.distributed
def test_verify_world_size_runs_the_distributed_check(capsys):
    """``ring-attention verify --world-size 2``: check_distributed through the factory, every rank's rows."""
    from ring_core.cli import main

    assert main(["verify", "--impl", "ring_dilated", "--dtype", "float64", "--world-size", "2"]) == 0
    output = capsys.readouterr().out
    assert f"{len(QUICK_CASES)} passed, 0 failed" in output and "on 2 gloo processes" in output
    total = len(QUICK_CASES)
    case_lines = [line for line in output.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in case_lines] == [f"[{i}/{total}" for i in range(1, total + 1)]
    assert all("ring_dilated" in line and line.endswith("PASS") for line in case_lines), output


@pytest.mark.distributed
def test_check_distributed_reports_each_case_as_it_finishes():
    """``on_result`` gets every case (all ranks' errors) while the group runs, the same as the returned list."""
    from ring_core.testing import check_distributed

    seen = []
    results = check_distributed("ring_dilated", QUICK_CASES[:2], 2, torch.float64, on_result=seen.append)
    assert [(r.case, r.rank_errors) for r in seen] == [(r.case, r.rank_errors) for r in results]
    assert len(seen) == 2 and all(r.passed and len(r.rank_errors) == 2 for r in seen)


# -- no processes ---------------------------------------------------------------------------------


def _plan(seq_len, world_size, rank, segments, rates, layout="contiguous", causal=False, heads=H):
    branch_list = tuple(branches(segments, rates, "lse", heads))
    return build_ring_plan(seq_len, world_size, rank, layout, branch_list, heads, heads, causal, torch.device("cpu"))


def test_plan_segments_inside_shards_have_no_peer_blocks():
    for rank in range(4):
        plan = _plan(64, 4, rank, [4, 8, 16], [1, 2, 4])
        assert all(not step.recv.kv_parts and not step.send.kv_parts for step in plan.steps)
        assert not plan.local.items


def test_plan_spanning_segment_only_pairs_partners():
    plan = _plan(64, 4, 1, [4, 32], [1, 2])
    assert {step.recv_from for step in plan.steps if step.recv.kv_parts} == {0}
    assert {step.send_to for step in plan.steps if step.send.kv_parts} == {0}
    rows = sum(part_rows(part) for step in plan.steps for part in step.recv.kv_parts)
    assert rows == 16  # 2 offsets x 8 selected rows of rank 0's shard of 16


def test_plan_zigzag_causal_balances_blocks():
    """Zigzag causal: every rank computes the same number of (query, key) pairs, and none is masked."""
    work = []
    for rank in range(4):
        plan = _plan(64, 4, rank, [64], [1], layout="zigzag", causal=True)
        pairs = sum(part_rows(b.q) * (part_rows(b.q) + 1) // 2 for b in plan.local_blocks)  # causal triangles
        for transfer in (plan.local, *(step.recv for step in plan.steps)):
            pairs += sum(part_rows(i.q_part) * part_rows(transfer.kv_parts[i.slot]) for i in transfer.items)
        work.append(pairs)
    assert len(set(work)) == 1, work


@pytest.mark.parametrize(
    ("seq_len", "world", "segments", "rates", "layout", "causal", "kv_heads", "padded"),
    [
        (64, 4, [64], [1], "contiguous", False, H, False),
        (64, 4, [64], [1], "zigzag", True, H, True),
        (96, 3, [4, 32, 96], [1, 2, 4], "contiguous", True, 2, True),
        (64, 2, [8, 64], [2, 4], "zigzag", False, 2, False),
        (60, 4, [6, 20, 60], [1, 2, 3], "contiguous", False, 1, True),
    ],
)
def test_send_bound_covers_every_send_of_every_rank(seq_len, world, segments, rates, layout, causal, kv_heads, padded):
    """The copy-engine slots are sized by ``send_bounds`` from shapes alone: no K/V (with flags) or dK/dV send of any
    rank may exceed its use's bound, or the transport would raise mid-call."""
    from ring_core.ring_schedule import RingDilatedSchedule, send_bounds

    n_local = seq_len // world
    branch_list = tuple(branches(segments, rates, "lse", H))
    for dtype, grad_dtype in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        q, k, v = _inputs(n_local, 0, dtype, heads=H, kv_heads=kv_heads)
        bounds = send_bounds(q, k, v, len(branch_list))
        largest = {"send": 0, "grad": 0}
        for rank in range(world):
            plan = build_ring_plan(seq_len, world, rank, layout, branch_list, H, kv_heads, causal, torch.device("cpu"))
            mask = torch.zeros(B, n_local, dtype=torch.bool) if padded else None
            schedule = RingDilatedSchedule(None, plan, comm=_FakeComm(rank), causal=causal, key_padding_mask=mask)
            for step in plan.steps:  # K/V (and flags) in the inputs' dtype, dK/dV in the accumulation dtype
                for use, element in (("send", k.element_size()), ("grad", grad_dtype.itemsize)):
                    nbytes = schedule._numel(schedule._shapes(step.send.kv_parts, k, v, use == "grad")) * element
                    largest[use] = max(largest[use], nbytes)
        for use, bound in bounds.items():
            assert 0 < largest[use] <= bound, (dtype, use, largest, bounds)


def test_backward_keeps_two_thirds_of_the_local_work_for_the_last_transfer():
    from ring_core.ring_schedule import _overlap_split

    assert _overlap_split([0.5, 0.5, 1.0]) == 1  # zigzag causal: one diagonal before the steps, the rest after
    assert _overlap_split([1.0]) == 0  # a single block waits for the steps
    assert _overlap_split([1.0, 1.0, 1.0]) == 1
    assert _overlap_split([3.0, 1.0]) == 0


class _FakeComm:
    def __init__(self, rank: int) -> None:
        self.rank = rank


def test_deprecated_name_warns_and_resolves():
    with pytest.warns(FutureWarning, match=r"RingDilatedAttentionV2Collective .* 0\.3\.0; use RingDilatedAttention"):
        cls = ring_core.RingDilatedAttentionV2Collective
    assert cls is RingDilatedAttention
    with pytest.warns(FutureWarning, match="use RingDilatedAttention"):
        module = ring_core.create_attention("RingDilatedAttentionV2Collective", segment_lengths=[8], dilation_rates=[1])
    assert isinstance(module, RingDilatedAttention)


def test_auto_picks_the_ring_only_when_asked():
    implementation, lines = ring_core.explain_auto("attention", "cpu", world_size=2, sequence_parallel=True)
    assert implementation.name == "ring_dilated", lines
    assert implementation.distributed
    implementation, lines = ring_core.explain_auto("attention", "cpu", world_size=2)  # a DDP group
    assert not implementation.distributed, lines
    assert any("pass process_group=" in line for line in lines), lines


def test_single_process_is_plain_attention():
    """No process group: any N, any layout; the same numbers as DilatedAttention."""
    q, k, v = (torch.randn(2, 21, 4, 8, dtype=torch.float64) for _ in range(3))
    config = {"segment_lengths": [6, 12], "dilation_rates": [1, 2]}
    for layout in LAYOUTS:
        ring = RingDilatedAttention(**config, layout=layout)
        torch.testing.assert_close(
            ring(q, k, v, is_causal=True), ring_core.DilatedAttention(**config)(q, k, v, is_causal=True)
        )
    assert ring.comm_stats.total_bytes == 0


def test_bad_transport_names_the_parameter():
    with pytest.raises(ValueError, match=r"transport must be one of \['nccl', 'copy_engine'\], got 'ib'"):
        RingDilatedAttention([8], [1], transport="ib")


def test_bad_layout_names_the_parameter():
    with pytest.raises(ValueError, match=r"layout must be one of \['contiguous', 'zigzag'\], got 'ring'"):
        RingDilatedAttention([8], [1], layout="ring")
