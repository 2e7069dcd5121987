"""Kernel dispatch: the first registered backend that can compute a request, or an error listing why none can.

:func:`block_kernel` is the one way an implementation sets up its kernel for a call: the
request, the dispatch, the scale and the dropout seed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .engine import BlockKernel
from .kernels import KernelBackend, KernelRequest, default_scale
from .registry import get_registry

__all__ = ["KernelNotAvailableError", "block_kernel", "dropout_seed", "record_kernel_choices", "select_kernel"]


class KernelNotAvailableError(RuntimeError):
    """No kernel backend (or not the forced one) can compute a request."""


_kernel_choices: list[list[str]] = []  # one list per open record_kernel_choices()


@contextmanager
def record_kernel_choices() -> Iterator[list[str]]:
    """Collect the names of the backends :func:`select_kernel` returns inside the block (what ran)."""
    names: list[str] = []
    _kernel_choices.append(names)
    try:
        yield names
    finally:
        _kernel_choices.remove(names)


def select_kernel(request: KernelRequest, name: str | None = None) -> KernelBackend:
    """The first backend in priority order with no reasons against ``request``.

    ``name`` (or ``RING_ATTENTION_KERNEL``) forces one backend; it raises with its
    reasons when it cannot serve the request.
    """
    backend = _select_kernel(request, name)
    for names in _kernel_choices:
        names.append(backend.name)
    return backend


def _select_kernel(request: KernelRequest, name: str | None) -> KernelBackend:
    registry = get_registry()
    if name is None:  # (an empty name is no kernel's, not "automatic": only the variable's empty value is unset)
        name = os.environ.get("RING_ATTENTION_KERNEL") or None
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


def dropout_seed() -> int:
    """A fresh dropout seed drawn from torch's generator (``torch.manual_seed`` makes runs repeatable).

    Below ``2**40``: schedules add per-rank and per-block offsets and the sum must stay inside int64.
    """
    return int(torch.randint(0, 2**40, (1,)).item())


def block_kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = False,
    has_mask: bool = False,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    kernel: str | None = None,
    seed: int | None = None,
    request: KernelRequest | None = None,
    window: bool = False,
) -> BlockKernel:
    """The kernel of one attention call, bound to its constants.

    The backend is :func:`select_kernel`'s for the request of ``q``/``k`` (or ``request``;
    ``kernel`` forces one by name; ``window``: some blocks carry a sliding window); the scale
    is ``softmax_scale`` or ``1/sqrt(D)``; with dropout the seed is ``seed`` when given
    (deterministic runs) else :func:`dropout_seed`.
    """
    if request is None:
        request = KernelRequest.for_tensors(q, k, causal=causal, has_mask=has_mask, dropout_p=dropout_p, window=window)
    if dropout_p <= 0:
        seed = 0
    elif seed is None:
        seed = dropout_seed()
    backend = select_kernel(request, kernel)
    return BlockKernel(backend, default_scale(q.shape[-1], softmax_scale), dropout_p, seed)
