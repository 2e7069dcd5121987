"""Spawn real gloo process groups in tests (torch.multiprocessing), for every package's tests.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` processes joined in one gloo group on a free port, returns the results
in rank order, and raises with every failing rank's traceback. A timeout kills the
processes, so a failing test never hangs. ``fn`` must be a module-level function of an
importable module (a test module is fine) and return something picklable. Spawning
costs seconds: group several checks into one call. ``host_reads`` and ``cu_seqlens_reads`` count
the host reads of a call's ``cu_seqlens`` (each one of a CUDA tensor waits for the GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch

from ring_core.testing import (
    PACKED_CASES,
    TOLERANCES,
    Case,
    DistributedRunError,
    packed_documents,
    run_gloo,
    sharded_case_errors,
    within_tolerance,
)

__all__ = ["DistributedRunError", "cu_seqlens_reads", "host_reads", "raised", "run_distributed"]


def run_distributed(fn: Callable[..., object], world_size: int, *args: object, timeout: float = 120.0) -> list[object]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; results in rank order."""
    return run_gloo(fn, world_size, *args, timeout=timeout)


def raised(fn: Callable[[], object]) -> tuple[str, str] | None:
    """``(type name, message)`` of what ``fn()`` raises, or None: in a rank, so that the parent checks that
    every rank raised the same error (and none hung)."""
    try:
        fn()
    except Exception as exc:  # every rank must raise; the parent checks type and message
        return type(exc).__name__, str(exc)
    return None


@contextlib.contextmanager
def host_reads() -> Iterator[list[tuple[int, ...]]]:
    """Inside, every ``tolist()`` of a tensor marked ``tensor._counted = True`` (a host read: for a CUDA tensor, a
    wait for the GPU) appends the tensor's shape to the list yielded."""
    reads: list[tuple[int, ...]] = []
    tolist = torch.Tensor.tolist

    def counting(self: torch.Tensor, *args: object, **kwargs: object) -> object:
        if getattr(self, "_counted", False):
            reads.append(tuple(self.shape))
        return tolist(self, *args, **kwargs)

    torch.Tensor.tolist = counting  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]


def cu_seqlens_reads(
    module: Callable[..., torch.Tensor], cases: Sequence[Case], rank: int, world_size: int, layout: str = "contiguous"
) -> list[tuple[int, dict[str, float]]]:
    """On rank ``rank`` of a running group, one call of ``module`` per packed case (in order, on this rank's
    shards, forward and backward: :func:`~ring_core.testing.sharded_case_errors`): how often the call read the
    ``cu_seqlens`` tensor it was given to the host, and its errors against the reference rows."""

    def call(*args: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs: object) -> torch.Tensor:
        cu_seqlens._counted = True  # type: ignore[attr-defined]
        return module(*args, cu_seqlens=cu_seqlens, **kwargs)

    results = []
    with host_reads() as reads:
        for seed, case in enumerate(cases):
            before = len(reads)
            errors = sharded_case_errors(call, case, rank, world_size, layout, seed=seed)
            results.append((len(reads) - before, errors))
    return results


# two calls with other document boundaries each time, for cu_seqlens_reads
_READ_CASE = next(case for case in PACKED_CASES if case.name == "packed-window-dilated-causal-gqa")
READ_CASES = (_READ_CASE, dataclasses.replace(_READ_CASE, documents=packed_documents(_READ_CASE.seq_len, 4, 9)))


def assert_one_read_per_call(by_name: dict[str, list[tuple[int, dict[str, float]]]]) -> None:
    """Every :func:`cu_seqlens_reads` result of :data:`READ_CASES` (by module name): one read per call, and exact
    (float64 bounds)."""
    for name, results in by_name.items():
        assert [count for count, _ in results] == [1] * len(READ_CASES), (name, results)
        assert all(within_tolerance(errors, TOLERANCES[torch.float64]) for _, errors in results), (name, results)
