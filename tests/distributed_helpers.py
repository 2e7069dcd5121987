"""Spawn real gloo process groups in tests (torch.multiprocessing), for every package's tests.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` processes joined in one gloo group on a free port, returns the results
in rank order, and raises with every failing rank's traceback. A timeout kills the
processes, so a failing test never hangs. ``fn`` must be a module-level function of an
importable module (a test module is fine) and return something picklable. Spawning
costs seconds: group several checks into one call.
"""

from __future__ import annotations

from collections.abc import Callable

from ring_core.testing import DistributedRunError, run_gloo

__all__ = ["DistributedRunError", "raised", "run_distributed"]


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
