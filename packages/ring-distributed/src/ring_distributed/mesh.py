"""The 2-D mesh of sequence parallelism: Ulysses groups (all-to-all) x ring groups (P2P).

``P = R * u`` ranks. Rank ``p`` of the parent group (its sequence shard index) is
``p = i * u + j``: Ulysses group ``i`` holds the consecutive ranks ``i*u .. i*u+u-1``
and ring group ``j`` the ranks ``j, j+u, j+2u, ...``. ``torchrun`` numbers the ranks
of a node consecutively, so when ``u`` divides the node size every Ulysses group
(the heavy all-to-all traffic) stays inside one node and the ring (neighbour P2P)
crosses nodes. :func:`mesh_layout` is the pure rule (tested with a simulated node
size); :func:`mesh_groups` creates the process groups, once per parent group.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ring_core.plugin import segments_within_shards

STRATEGIES = ("auto", "ring", "ulysses", "hybrid", "allgather")


@dataclass(frozen=True)
class MeshLayout:
    """Which ranks of the parent group form each Ulysses group and each ring group."""

    world_size: int
    ulysses_degree: int
    node_size: int
    ulysses_groups: tuple[tuple[int, ...], ...]
    ring_groups: tuple[tuple[int, ...], ...]

    @property
    def ring_size(self) -> int:
        return self.world_size // self.ulysses_degree

    def coordinates(self, rank: int) -> tuple[int, int]:
        """``(ring index i, Ulysses index j)`` of parent-group rank ``rank``."""
        return divmod(rank, self.ulysses_degree)


def check_positive(name: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` if it is a positive int (or None when ``optional``), else a ``ValueError`` naming ``name``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
    return value


def mesh_layout(world_size: int, ulysses_degree: int, node_size: int | None = None) -> MeshLayout:
    """The Ulysses and ring groups of ``world_size`` ranks (``node_size`` ranks per node, default all).

    Raises ``ValueError`` when ``ulysses_degree`` does not divide ``world_size``, or when a
    Ulysses group would straddle a node boundary (``ulysses_degree`` must divide the node
    size, or be a multiple of it).
    """
    world_size = check_positive("world_size", world_size)
    u = check_positive("ulysses_degree", ulysses_degree)
    node = world_size if node_size is None else check_positive("node_size", node_size)
    if world_size % u != 0:
        raise ValueError(
            f"ulysses_degree must divide the world size: ulysses_degree={u}, P={world_size}; "
            f"valid: {divisors(world_size)}"
        )
    if world_size % node != 0 and node < world_size:
        raise ValueError(f"node_size must divide the world size: node_size={node}, P={world_size}")
    if node % u != 0 and u % node != 0:
        raise ValueError(
            f"ulysses_degree={u} would split Ulysses groups across nodes of node_size={node} ranks: use a divisor "
            f"of the node size {divisors(node)} (or a multiple of it)"
        )
    ring = world_size // u
    ulysses_groups = tuple(tuple(range(i * u, (i + 1) * u)) for i in range(ring))
    ring_groups = tuple(tuple(range(j, world_size, u)) for j in range(u))
    return MeshLayout(world_size, u, min(node, world_size), ulysses_groups, ring_groups)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def default_node_size(world_size: int) -> int:
    """Ranks per node: ``LOCAL_WORLD_SIZE`` (set by torchrun), else the whole world (one node)."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value and value.isdigit() and int(value) > 0 and world_size % int(value) == 0:
        return int(value)
    return world_size


def max_ulysses_degree(world_size: int, node_size: int, num_heads: int, num_kv_heads: int) -> int:
    """The largest Ulysses degree inside a node that divides the query and key/value head counts."""
    limit = math.gcd(math.gcd(world_size, node_size), math.gcd(num_heads, num_kv_heads))
    return max(d for d in divisors(limit))


def segments_cross_shards(
    segment_lengths: tuple[int, ...], dilation_rates: tuple[int, ...], seq_len: int, world_size: int, layout: str
) -> bool:
    """Whether some dilated branch has segments that cross the boundary of a shard's piece.

    Dense attention (one branch, rate 1, a segment covering ``N``) counts as not crossing:
    the ring overlaps its traffic completely there.
    """
    if len(segment_lengths) == 1 and dilation_rates[0] == 1 and segment_lengths[0] >= seq_len:
        return False
    return not segments_within_shards(seq_len // world_size, world_size, layout, segment_lengths)


def resolve_strategy(
    strategy: str,
    ulysses_degree: int | None,
    world_size: int,
    node_size: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    crosses_shards: bool = True,
) -> tuple[str, int]:
    """``(strategy, ulysses degree)`` for a call; clear ``ValueError`` for impossible choices.

    ``"auto"`` (the choices follow ``docs/benchmarks/distributed-*.json``, from ``tools/bench/distributed.py``): the ring when no
    segment crosses a shard (it sends nothing, where Ulysses still moves every head twice)
    and for dense attention (as fast, and it keeps far less memory between forward and
    backward); Ulysses when dilated segments cross shards (the ring would move the selected
    rows of every spanning segment), over the largest in-node degree that divides both head
    counts (``"hybrid"`` when that is not every rank), else the ring.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if world_size == 1:
        return "ring", 1
    if strategy == "auto":
        if ulysses_degree is not None:
            u = ulysses_degree
        elif not crosses_shards:
            u = 1
        else:
            u = max_ulysses_degree(world_size, node_size, num_heads, num_kv_heads)
        strategy = "ring" if u == 1 else "ulysses" if u == world_size else "hybrid"
    elif strategy == "ring":
        if ulysses_degree not in (None, 1):
            raise ValueError(f"strategy='ring' uses no Ulysses groups: ulysses_degree must be 1, got {ulysses_degree}")
        u = 1
    elif strategy == "ulysses":
        if ulysses_degree not in (None, world_size):
            raise ValueError(
                f"strategy='ulysses' spans the whole group: ulysses_degree must be P={world_size}, got "
                f"{ulysses_degree} (use strategy='hybrid' for a 2-D mesh)"
            )
        u = world_size
    elif strategy == "hybrid":
        u = ulysses_degree or max_ulysses_degree(world_size, node_size, num_heads, num_kv_heads)
        if not 1 < u < world_size:
            raise ValueError(
                f"strategy='hybrid' needs 1 < ulysses_degree < P={world_size}, got ulysses_degree={u}"
                + ("" if ulysses_degree else " (the largest in-node degree dividing the head counts)")
            )
    else:  # allgather (over the ring groups, after an optional Ulysses all-to-all)
        u = ulysses_degree or 1
    if world_size % u != 0:
        raise ValueError(
            f"ulysses_degree must divide the world size: ulysses_degree={u}, P={world_size}; "
            f"valid: {divisors(world_size)}"
        )
    if num_heads % u != 0 or num_kv_heads % u != 0:
        raise ValueError(
            f"strategy={strategy!r} with ulysses_degree={u} splits heads over {u} ranks: the number of query heads "
            f"and of key/value heads must be divisible by {u}, got H={num_heads}, H_kv={num_kv_heads}; valid "
            f"ulysses_degree: {[d for d in divisors(world_size) if num_heads % d == 0 and num_kv_heads % d == 0]}"
        )
    return strategy, u


# -- process groups -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshGroups:
    """This rank's view of the mesh: its Ulysses group and ring group with ranks and sizes.

    A group of size one is ``None`` and never communicates. ``global_ranks[p]`` is the
    global rank of sequence shard ``p``.
    """

    ulysses_group: Any
    ulysses_rank: int
    ulysses_size: int
    ring_group: Any
    ring_rank: int
    ring_size: int
    global_ranks: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def shard_index(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank


_lock = threading.Lock()
_groups: dict[tuple[int, ...], Any] = {}


def _subgroup(ranks: tuple[int, ...]) -> Any:
    """A process group of these global ranks, created once (only its members take part)."""
    with _lock:
        if ranks not in _groups:
            _groups[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
        return _groups[ranks]


def group_global_ranks(process_group: Any) -> tuple[int, ...]:
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return (0,)
    if process_group is None:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(process_group))


def mesh_groups(process_group: Any, ulysses_degree: int, node_size: int | None = None) -> MeshGroups:
    """Split ``process_group`` (``None``: the default group) into Ulysses x ring groups (cached)."""
    ranks = group_global_ranks(process_group)
    world_size = len(ranks)
    layout = mesh_layout(world_size, ulysses_degree, node_size or world_size)
    if world_size == 1:
        return MeshGroups(None, 0, 1, None, 0, 1, ranks)
    rank = dist.get_rank(process_group)
    i, j = layout.coordinates(rank)
    u, r = layout.ulysses_degree, layout.ring_size
    whole = process_group if process_group is not None else dist.group.WORLD
    if u == 1:
        return MeshGroups(None, 0, 1, whole, i, r, ranks)
    if r == 1:
        return MeshGroups(whole, j, u, None, 0, 1, ranks)
    ulysses = _subgroup(tuple(ranks[p] for p in layout.ulysses_groups[i]))
    ring = _subgroup(tuple(ranks[p] for p in layout.ring_groups[j]))
    return MeshGroups(ulysses, j, u, ring, i, r, ranks)


def device_mesh_groups(device_mesh: Any) -> MeshGroups:
    """The groups of a 2-D ``DeviceMesh`` with dims ``("ring", "ulysses")`` (by name, else in that order)."""
    if device_mesh.ndim != 2:
        raise ValueError(
            f"device_mesh must be 2-D (ring, ulysses), got {device_mesh.ndim} dims; pass a 1-D group as process_group"
        )
    names = device_mesh.mesh_dim_names
    ring_dim, ulysses_dim = ("ring", "ulysses") if names and set(names) == {"ring", "ulysses"} else (0, 1)
    mesh = device_mesh.mesh
    if names and set(names) == {"ring", "ulysses"} and names[0] == "ulysses":
        mesh = mesh.t()
    ring_size, ulysses_size = mesh.shape
    ring_group = device_mesh.get_group(ring_dim) if ring_size > 1 else None
    ulysses_group = device_mesh.get_group(ulysses_dim) if ulysses_size > 1 else None
    return MeshGroups(
        ulysses_group,
        device_mesh.get_local_rank(ulysses_dim),
        ulysses_size,
        ring_group,
        device_mesh.get_local_rank(ring_dim),
        ring_size,
        tuple(int(x) for x in mesh.flatten().tolist()),
    )
