"""RingDistributedDilatedAttention on real gloo process groups: every strategy and mesh vs the reference.

One group of 4 processes runs every check (spawning costs seconds) and the tests below
assert on its results: P = 4 as 1x4 (ring), 2x2 (hybrid), 4x1 (Ulysses), all-gather
(with and without a Ulysses dim), a ``DeviceMesh``, a simulated 2-node machine; float64,
dense and dilated, causal and not, contiguous and zigzag, GQA, padding, both merges.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.distributed as dist

import ring_core
from distributed_helpers import cu_seqlens_reads, run_distributed
from ring_core.testing import PACKED_CASES, Case, fit_case, sharded_case_errors
from ring_distributed import (
    RingDilatedAttentionProduction,
    RingDistributedDilatedAttention,
    mesh_layout,
    resolve_strategy,
)
from ring_flash import RingDilatedAttentionFlash

WORLD = 4
LAYOUTS = ("contiguous", "zigzag")

# Head counts divisible by 4 (Ulysses over 4 ranks) and rates up to 4 (head chunks with nonzero offsets).
CASES = (
    Case("dense", 32, 4, (64,), (1,)),
    Case("dense-causal-pad", 24, 4, (24,), (1,), causal=True, padding=True),
    Case("dilated-causal-gqa", 48, 8, (4, 8, 48), (1, 2, 4), kv_heads=4, causal=True),
    Case("dilated-pad-segment>n", 32, 4, (4, 64), (1, 4), padding=True),
    Case("head-groups-causal", 40, 8, (4, 8, 64), (1, 2, 4), merge="head_groups", causal=True),
)

# name -> constructor options; the expected (strategy, ulysses degree) at P = 4
MESHES = {
    "ring 1x4": ({"strategy": "ring"}, ("ring", 1)),
    "hybrid 2x2": ({"strategy": "hybrid", "ulysses_degree": 2}, ("hybrid", 2)),
    "ulysses 4x1": ({"strategy": "ulysses"}, ("ulysses", 4)),
    "allgather": ({"strategy": "allgather"}, ("allgather", 1)),
    "allgather u=2": ({"strategy": "allgather", "ulysses_degree": 2}, ("allgather", 2)),
    "hybrid, 2 nodes of 2": ({"strategy": "hybrid", "node_size": 2}, ("hybrid", 2)),
}


def _exactness(rank, world_size):
    rows = []
    for mesh, (options, _) in MESHES.items():
        for case in CASES:
            for layout in LAYOUTS:
                fitted = fit_case(case, world_size, layout)
                module = RingDistributedDilatedAttention(**fitted.config, layout=layout, **options)
                errors = sharded_case_errors(module, fitted, rank, world_size, layout, seed=len(rows))
                rows.append((mesh, case.name, layout, errors, module.last_strategy))
    return rows


def _device_mesh(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses"))
    case = CASES[2]
    rows = []
    for layout in LAYOUTS:
        for strategy in ("hybrid", "allgather"):
            module = RingDistributedDilatedAttention(**case.config, layout=layout, device_mesh=mesh, strategy=strategy)
            # the shard index with a mesh is ring_index * 2 + ulysses_index: here the global rank
            errors = sharded_case_errors(module, fit_case(case, world_size, layout), rank, world_size, layout, seed=7)
            rows.append((strategy, layout, errors))
    # packed documents: one host read of cu_seqlens per call, though the ranks agree in both dims of the mesh
    packed = fit_case(next(c for c in PACKED_CASES if c.name == "packed-window-dilated-causal-gqa"), world_size)
    module = RingDistributedDilatedAttention(**packed.config, device_mesh=mesh, strategy="hybrid")
    return {"rows": rows, "packed": cu_seqlens_reads(module, [packed], rank, world_size)}


def _bytes(rank):
    """Ring bytes: hybrid 2x2 rings over 2 ranks with half the heads; Ulysses sends nothing on a ring."""
    q, k, v = (torch.randn(1, 8, 4, 8, dtype=torch.float64) for _ in range(3))
    sent = {}
    for name, options in (("ring", {"strategy": "ring"}), ("hybrid", {"strategy": "hybrid", "ulysses_degree": 2})):
        module = RingDistributedDilatedAttention([32], [1], **options)
        module(q, k, v)
        sent[name] = module.comm_stats.forward_bytes
    module = RingDistributedDilatedAttention([32], [1], strategy="ulysses")
    module(q, k, v)
    sent["ulysses"] = module.comm_stats.total_bytes
    return sent


def _expect_error(fn):
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return None


def _errors(rank):
    """Bad head counts and degrees: every rank raises the same clear error; the group still works after."""
    out = {}

    def call(heads=6, kv_heads=6, n=8, **options):
        module = RingDistributedDilatedAttention([32], [1], **options)
        q = torch.randn(1, n, heads, 8, dtype=torch.float64)
        k, v = (torch.randn(1, n, kv_heads, 8, dtype=torch.float64) for _ in range(2))
        return module(q, k, v)

    out["ulysses-heads"] = _expect_error(lambda: call(strategy="ulysses"))
    out["kv-heads"] = _expect_error(lambda: call(8, 2, strategy="allgather", ulysses_degree=4))
    out["hybrid-degree"] = _expect_error(lambda: call(8, 8, strategy="hybrid", ulysses_degree=3))
    out["ring-with-degree"] = _expect_error(lambda: call(8, 8, strategy="ring", ulysses_degree=2))
    out["straddles-nodes"] = _expect_error(lambda: call(8, 8, strategy="hybrid", ulysses_degree=2, node_size=3))
    out["shapes-differ"] = _expect_error(lambda: call(8, 8, n=8 if rank else 4, strategy="hybrid", ulysses_degree=2))
    # the lse's gradient is one more pass of the backward's communication: ranks must agree on return_lse
    lse_module = RingDilatedAttentionProduction([32], [1], strategy="hybrid", ulysses_degree=2)
    q, k, v = (torch.randn(1, 8, 8, 8, dtype=torch.float64) for _ in range(3))
    out["return-lse-differs"] = _expect_error(lambda: lse_module(q, k, v, return_lse=rank == 2))
    # the same mismatch through each ring class: validate_ring_inputs(name=) names the calling class
    q, k, v = (torch.randn(1, 8 if rank else 4, 4, 8, dtype=torch.float64) for _ in range(3))
    out["named"] = {
        cls.__name__: _expect_error(functools.partial(cls([32], [1], **options), q, k, v))
        for cls, options in (
            (RingDilatedAttentionFlash, {}),
            (RingDistributedDilatedAttention, {"strategy": "ring"}),
            (RingDilatedAttentionProduction, {"strategy": "ring"}),
        )
    }
    for name, config, heads in (
        ("auto-crossing-3-heads", ([4, 32], [1, 2]), 3),  # no Ulysses degree > 1 fits 3 heads
        ("auto-crossing", ([4, 32], [1, 2]), 4),
        ("auto-dense", ([32], [1]), 4),
        ("auto-in-shard", ([4, 8], [1, 2]), 4),
    ):
        module = RingDistributedDilatedAttention(*config)
        q, k, v = (torch.randn(1, 8, heads, 8, dtype=torch.float64) for _ in range(3))
        module(q, k, v)
        out[name] = module.last_strategy
    out["still-works"] = call(8, 8, strategy="hybrid", ulysses_degree=2).shape
    return out


def _world(rank, world_size):
    torch.manual_seed(rank)
    result = {
        "exact": _exactness(rank, world_size),
        "mesh": _device_mesh(rank, world_size),
        "bytes": _bytes(rank),
        "errors": _errors(rank),
    }
    dist.barrier()
    return result


@pytest.fixture(scope="module")
def world():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return run_distributed(_world, WORLD, timeout=600)


@pytest.mark.distributed
@pytest.mark.parametrize("mesh", list(MESHES))
def test_every_rank_matches_reference_rows(world, mesh):
    """out, dq, dk, dv of every rank equal the float64 reference rows (SPEC tolerances)."""
    checked = 0
    for rank, result in enumerate(world):
        for name, case, layout, errors, strategy in result["exact"]:
            if name != mesh:
                continue
            assert errors["out"] <= 1e-10, (rank, mesh, case, layout, errors)
            assert max(errors[g] for g in ("dq", "dk", "dv")) <= 1e-9, (rank, mesh, case, layout, errors)
            assert strategy == MESHES[mesh][1], (mesh, strategy)
            checked += 1
    assert checked == WORLD * len(CASES) * len(LAYOUTS)


@pytest.mark.distributed
def test_device_mesh_2x2(world):
    for rank, result in enumerate(world):
        assert len(result["mesh"]["rows"]) == 4
        for strategy, layout, errors in result["mesh"]["rows"]:
            assert errors["out"] <= 1e-10 and max(errors.values()) <= 1e-9, (rank, strategy, layout, errors)


@pytest.mark.distributed
def test_device_mesh_reads_cu_seqlens_once_per_call(world):
    """The ranks agree in both dims of the mesh, on values read to the host once (packed documents, exact)."""
    for rank, result in enumerate(world):
        ((reads, errors),) = result["mesh"]["packed"]
        assert reads == 1, (rank, reads)
        assert errors["out"] <= 1e-10 and max(errors.values()) <= 1e-9, (rank, errors)


@pytest.mark.distributed
def test_hybrid_rings_carry_half_the_heads_over_half_the_ranks(world):
    """Dense, N = 32 over 4 ranks, H = 4, D = 8, float64: the ring sends its K/V shard (8 rows) to 3 peers;
    hybrid 2x2 sends a shard of 16 rows with 2 heads to 1 peer; Ulysses alone uses no ring."""
    shard = 8 * 4 * 8 * 8  # rows * heads * dim * bytes
    for result in world:
        assert result["bytes"]["ring"] == 3 * 2 * shard
        assert result["bytes"]["hybrid"] == 1 * 2 * (2 * shard // 2)
        assert result["bytes"]["ulysses"] == 0


@pytest.mark.distributed
def test_errors_are_raised_on_every_rank(world):
    expected = {
        "ulysses-heads": ("ValueError", r"ulysses_degree=4 .* divisible by 4, got H=6, H_kv=6; valid ulysses_degree: "),
        "kv-heads": ("ValueError", r"got H=8, H_kv=2; valid ulysses_degree: \[1, 2\]"),
        "hybrid-degree": ("ValueError", r"ulysses_degree must divide the world size: ulysses_degree=3, P=4"),
        "ring-with-degree": ("ValueError", r"strategy='ring' uses no Ulysses groups: ulysses_degree must be 1, got 2"),
        "straddles-nodes": ("ValueError", r"node_size must divide the world size: node_size=3, P=4"),
        "shapes-differ": ("RingConfigError", r"local_len: rank 0=4, rank 1=8"),
        "return-lse-differs": ("RingConfigError", r"config: rank 0="),
    }
    import re

    for rank, result in enumerate(world):
        errors = result["errors"]
        for key, (kind, pattern) in expected.items():
            assert errors[key] is not None, (rank, key)
            assert errors[key][0] == kind and re.search(pattern, errors[key][1]), (rank, key, errors[key])
        assert errors["auto-crossing-3-heads"] == ("ring", 1)
        assert errors["auto-crossing"] == ("ulysses", 4)
        assert errors["auto-dense"] == errors["auto-in-shard"] == ("ring", 1)
        assert errors["still-works"] == (1, 8, 8, 8)


@pytest.mark.distributed
def test_mismatch_errors_name_the_calling_class(world):
    """Rank 0 passes N/P = 4, the others 8: every rank raises RingConfigError starting with the module's class."""
    names = ["RingDilatedAttentionFlash", "RingDistributedDilatedAttention", "RingDilatedAttentionProduction"]
    for rank, result in enumerate(world):
        named = result["errors"]["named"]
        assert sorted(named) == sorted(names), (rank, named)
        for name in names:
            assert named[name] is not None, (rank, name)
            kind, message = named[name]
            assert kind == "RingConfigError", (rank, name, named[name])
            assert message.startswith(f"{name}: ranks passed different shapes"), (rank, name, message)
            assert "local_len: rank 0=4, rank 1=8" in message, (rank, name, message)


# -- no processes needed ------------------------------------------------------------------------------


def test_mesh_layout_keeps_ulysses_inside_a_node():
    """8 ranks on 2 simulated nodes of 4: Ulysses groups inside a node, rings across nodes."""
    layout = mesh_layout(8, 2, node_size=4)
    assert layout.ulysses_groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert layout.ring_groups == ((0, 2, 4, 6), (1, 3, 5, 7))
    layout = mesh_layout(8, 4, node_size=4)
    assert layout.ulysses_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert layout.ring_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    for group in layout.ulysses_groups:
        assert len({rank // 4 for rank in group}) == 1  # one node
    assert mesh_layout(8, 8, node_size=4).ring_groups == tuple((j,) for j in range(8))  # whole nodes: allowed
    with pytest.raises(ValueError, match=r"ulysses_degree=4 would split Ulysses groups across nodes of node_size=6"):
        mesh_layout(12, 4, node_size=6)
    with pytest.raises(ValueError, match=r"ulysses_degree must divide the world size: ulysses_degree=3, P=8"):
        mesh_layout(8, 3)


def test_auto_strategy_uses_the_node_and_the_heads(monkeypatch):
    assert resolve_strategy("auto", None, 8, 4, 16, 16) == ("hybrid", 4)  # 2 nodes of 4
    assert resolve_strategy("auto", None, 4, 4, 16, 16) == ("ulysses", 4)
    assert resolve_strategy("auto", None, 4, 4, 16, 2) == ("hybrid", 2)  # GQA: 2 kv heads
    assert resolve_strategy("auto", None, 4, 4, 5, 5) == ("ring", 1)
    assert resolve_strategy("auto", None, 1, 1, 5, 5) == ("ring", 1)
    assert resolve_strategy("auto", None, 4, 4, 16, 16, crosses_shards=False) == ("ring", 1)
    assert resolve_strategy("hybrid", None, 8, 4, 16, 16, crosses_shards=False) == ("hybrid", 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    from ring_distributed.mesh import default_node_size

    assert default_node_size(8) == 2


def test_auto_uses_the_ring_unless_dilated_segments_cross_shards():
    """What tools/bench/distributed.py measured: the ring for dense and in-shard segments, else Ulysses."""
    from ring_distributed.mesh import segments_cross_shards

    n = 4 * 32768
    assert not segments_cross_shards((n,), (1,), n, 4, "zigzag")  # dense
    assert not segments_cross_shards((2048, 8192, 32768), (1, 2, 4), n, 4, "contiguous")
    assert segments_cross_shards((2048, 8192, 32768), (1, 2, 4), n, 4, "zigzag")  # pieces of 16K
    assert segments_cross_shards((8192, 32768, n), (1, 4, 16), n, 4, "contiguous")
    assert segments_cross_shards((3000,), (1,), n, 4, "contiguous")  # boundaries not aligned


def test_registered_and_single_process_is_plain_attention():
    q, k, v = (torch.randn(2, 21, 4, 8, dtype=torch.float64) for _ in range(3))
    config = {"segment_lengths": [6, 12], "dilation_rates": [1, 2]}
    for name in ("ring_distributed_dilated", "RingDistributedDilatedAttention", "ring_dilated_production"):
        module = ring_core.create_attention(name, **config)
        torch.testing.assert_close(
            module(q, k, v, is_causal=True), ring_core.DilatedAttention(**config)(q, k, v, is_causal=True)
        )
    impl = ring_core.resolve_implementation("ring_distributed_dilated")
    assert impl.distributed and impl.package == "ring-distributed"


def test_bad_arguments_name_the_parameter():
    with pytest.raises(
        ValueError, match=r"strategy must be one of \['auto', 'ring', 'ulysses', 'hybrid', 'allgather'\]"
    ):
        RingDistributedDilatedAttention([8], [1], strategy="tree")
    with pytest.raises(ValueError, match=r"ulysses_degree must be a positive int or None, got 0"):
        RingDistributedDilatedAttention([8], [1], ulysses_degree=0)
    with pytest.raises(ValueError, match="either process_group or device_mesh"):
        RingDistributedDilatedAttention([8], [1], process_group=object(), device_mesh=object())
