"""Kernel dispatch: the first registered backend that can compute a request, or an error listing why none can."""

from __future__ import annotations

import os

from .kernels import KernelBackend, KernelRequest
from .registry import get_registry

__all__ = ["KernelNotAvailableError", "select_kernel"]


class KernelNotAvailableError(RuntimeError):
    """No kernel backend (or not the forced one) can compute a request."""


def select_kernel(request: KernelRequest, name: str | None = None) -> KernelBackend:
    """The first backend in priority order with no reasons against ``request``.

    ``name`` (or ``RING_ATTENTION_KERNEL``) forces one backend; it raises with its
    reasons when it cannot serve the request.
    """
    registry = get_registry()
    name = name or os.environ.get("RING_ATTENTION_KERNEL") or None
    if name is not None:
        backend = registry.kernels.get(name)
        if backend is None:
            raise KernelNotAvailableError(
                f"kernel {name!r} is not registered; known kernels: {sorted(registry.kernels)}"
            )
        reasons = backend.not_supported_reasons(request)
        if reasons:
            raise KernelNotAvailableError(f"kernel {name!r} cannot run {request.describe()}: " + "; ".join(reasons))
        return backend
    table = []
    for backend in registry.sorted_kernels():
        reasons = backend.not_supported_reasons(request)
        if not reasons:
            return backend
        table.append(f"  {backend.name}: " + "; ".join(reasons))
    raise KernelNotAvailableError(
        f"no kernel backend supports {request.describe()}:\n" + "\n".join(table or ["  (none registered)"])
    )
