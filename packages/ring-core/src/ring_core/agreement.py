"""Cross-rank agreement: every rank checks its inputs, then all ranks raise the same error (or none).

One small ``all_gather`` of an integer descriptor per rank (:func:`agree_across_ranks`)
replaces a hang or a wrong result when ranks disagree on shapes, dtypes or
configuration; :func:`validate_ring_inputs` is the ring's use of it, on every call: ranks
that have all seen two signatures may still call with different ones, and equal byte
sizes would then give a wrong result without any error. :func:`validate_inputs` is where a
module's call starts: the local checks alone on one process, else the agreement.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .comm import RingComm, timed_wait
from .kernels import FLOAT_DTYPES
from .sharding import LAYOUTS
from .validation import MERGES, check_cu_seqlens, check_qkv, check_window

__all__ = ["RingConfigError", "agree_across_ranks", "differing_fields", "validate_inputs", "validate_ring_inputs"]


class RingConfigError(ValueError):
    """Ranks disagree on shapes, dtypes or configuration, or one rank rejected its inputs."""


_DESCRIPTOR_FIELDS = (
    "ok",
    "batch",
    "local_len",
    "heads",
    "kv_heads",
    "head_dim",
    "value_dim",
    "dtype",
    "device_type",
    "causal",
    "padding",
    "layout",
    "merge",
    "config",
    "scale",
    "window_size",
    "cu_seqlens",
)


def _describe(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    layout: str,
    merge: str,
    config: tuple[object, ...],
    scale: float | None,
    window: tuple[int, int],
    documents: tuple[int, ...] | None,
) -> list[int]:
    b, n, h, d = q.shape
    return [
        1,
        b,
        n,
        h,
        k.shape[2],
        d,
        v.shape[3],
        FLOAT_DTYPES.index(q.dtype) if q.dtype in FLOAT_DTYPES else -1,
        0 if q.device.type == "cpu" else 1,
        int(causal),
        int(key_padding_mask is not None),
        LAYOUTS.index(layout),
        MERGES.index(merge),
        zlib.crc32(repr(config).encode()),
        zlib.crc32(repr(scale).encode()),
        zlib.crc32(repr(tuple(window)).encode()),
        zlib.crc32(repr(documents).encode()),
    ]


def _descriptor_device(group: Any, q: Any) -> torch.device:
    if isinstance(q, torch.Tensor) and q.device.type != "cpu":
        return q.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_across_ranks(
    check: Callable[[], Sequence[int]], fields: Sequence[str], comm: RingComm, *, name: str, like: Any = None
) -> list[list[int]]:
    """Run this rank's ``check``, then one small ``all_gather`` in ``comm``, so every rank raises (or none does).

    ``check`` raises ``TypeError``/``ValueError`` on bad input, else returns one int per
    entry of ``fields`` (the first, ``"ok"``, is 1). A rank whose check failed raises its
    error after the all-gather; the others raise :class:`RingConfigError` naming it (messages
    start with ``name``). Returns the gathered table, one row per rank; ``like`` (a tensor
    or None) picks the device of the all-gather with the group's backend. The all-gather
    waits at most ``comm.timeout`` seconds (:class:`~ring_core.comm.CollectiveError` after).
    """
    local_error: Exception | None = None
    try:
        descriptor = list(check())
    except (TypeError, ValueError) as exc:
        local_error = exc
        descriptor = [0] * len(fields)
    if comm.world_size > 1:
        mine = torch.tensor(descriptor, dtype=torch.int64, device=_descriptor_device(comm.group, like))
        gathered = [torch.empty_like(mine) for _ in range(comm.world_size)]
        work = dist.all_gather(gathered, mine, group=comm.group, async_op=True)
        timed_wait(
            work, comm.timeout, f"{comm.context or name + ': '}agreement of the inputs across ranks (all-gather)"
        )
        table = [t.tolist() for t in gathered]
    else:
        table = [descriptor]
    if local_error is not None:
        raise local_error
    failed = [r for r, row in enumerate(table) if row[0] == 0]
    if failed:
        raise RingConfigError(
            f"{name}: rank(s) {failed} of {comm.world_size} rejected their inputs (see the error "
            f"raised there); nothing was computed"
        )
    return table


def differing_fields(table: list[list[int]], fields: Sequence[str]) -> tuple[list[str], str]:
    """The ``fields`` whose values differ between the rows (ranks) of ``table``, and ``"field: rank 0=a, ..."``."""
    differing = [field for i, field in enumerate(fields) if len({row[i] for row in table}) > 1]
    details = "; ".join(
        f"{field}: " + ", ".join(f"rank {r}={row[fields.index(field)]}" for r, row in enumerate(table))
        for field in differing
    )
    return differing, details


def validate_ring_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    causal: bool,
    layout: str,
    merge: str,
    config: tuple[object, ...],
    scale: float | None,
    comm: RingComm,
    name: str = "RingDilatedAttention",
    window_size: tuple[int, int] = (-1, -1),
    cu_seqlens: torch.Tensor | None = None,
    seq_len: int | None = None,
    local_check: Callable[[], Sequence[object]] | None = None,
) -> tuple[int, ...] | None:
    """Local checks, then one small ``all_gather`` in ``comm`` so every rank raises the same error (or none).

    ``config`` (any repr-able tuple), ``scale``, ``window_size`` and ``cu_seqlens`` (global
    document boundaries, the same on every rank) must match on every rank; errors start
    with ``name``. ``seq_len`` is the global ``N`` that ``cu_seqlens`` must end at (default:
    this rank's length times the group's size). ``local_check`` (after the checks of ``q, k,
    v``) runs more of this rank's checks, raising ``TypeError``/``ValueError``, and returns
    values that must match too (added to ``config``). Returns the checked ``cu_seqlens``
    values (None without).
    """
    documents: list[tuple[int, ...] | None] = [None]

    def check() -> list[int]:
        check_qkv(q, k, v, key_padding_mask)
        window = check_window(window_size)
        if cu_seqlens is not None:
            total = q.shape[1] * comm.world_size if seq_len is None else seq_len
            documents[0] = check_cu_seqlens(cu_seqlens, total, q.shape[0])
        extra = () if local_check is None else tuple(local_check())
        return _describe(
            q, k, v, key_padding_mask, causal, layout, merge, (*config, *extra), scale, window, documents[0]
        )

    table = agree_across_ranks(check, _DESCRIPTOR_FIELDS, comm, name=name, like=q)
    differing, details = differing_fields(table, _DESCRIPTOR_FIELDS)
    if differing:
        hint = ""
        if "local_len" in differing:
            hint = " (the global sequence length N must be divisible by the world size P, every rank holding N/P)"
        if "cu_seqlens" in differing:
            hint += " (cu_seqlens holds global document boundaries: pass the same tensor on every rank)"
        raise RingConfigError(
            f"{name}: ranks passed different shapes/dtypes/configurations: {details}{hint}; "
            f"dtype codes index {[str(d).replace('torch.', '') for d in FLOAT_DTYPES]}"
        )
    local_len = table[0][2]
    if layout == "zigzag" and comm.world_size > 1 and local_len % 2 != 0:
        raise RingConfigError(
            f"layout='zigzag' needs N divisible by 2*P: each of the {comm.world_size} ranks holds {local_len} "
            f"positions (N={local_len * comm.world_size}), which is odd"
        )
    return documents[0]


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    *,
    world_size: int,
    comms: Callable[[], Iterable[RingComm]],
    cu_seqlens: torch.Tensor | None = None,
    **agreement: Any,
) -> tuple[int, ...] | None:
    """A call's checks before any work or communication, with the same error on every rank: a module's first step.

    On one process (``world_size == 1``) there is nothing to agree on: only this rank's checks
    run (:func:`~ring_core.validation.check_qkv`, then ``cu_seqlens`` against ``N = q.shape[1]``),
    without a collective, so ``torch.compile`` traces them. Otherwise
    :func:`validate_ring_inputs` runs in each communicator of ``comms()`` (called only then: one
    group, or one per dimension of a device mesh), with ``seq_len = q.shape[1] * world_size``
    and ``agreement`` as its other keyword arguments (``causal``, ``layout``, ``merge``,
    ``config``, ``scale``, ``name``, ``window_size``, ``local_check``); ``cu_seqlens`` is read to
    the host once, in the first of them. Returns the checked
    ``cu_seqlens`` values (None without, or under ``torch.compile``), the same on every rank,
    for :func:`~ring_core.ops.run_attention`'s ``documents``: the ops then need not read the
    tensor again (each read of a CUDA tensor waits for the GPU).
    """
    if world_size == 1:
        check_qkv(q, k, v, key_padding_mask)
        return None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q.shape[1], q.shape[0])
    documents = None
    for comm in comms():
        # after the first communicator, a host copy of the values read there: the tensor is read once
        checked = cu_seqlens if documents is None else torch.tensor(documents)
        documents = validate_ring_inputs(
            q, k, v, key_padding_mask, comm=comm, cu_seqlens=checked, seq_len=q.shape[1] * world_size, **agreement
        )
    return documents
